"""The study's fine-tuning recipe, one place for the ``finetune`` stage and the deep ensemble's
members: read the prepared train split, estimate and check the stage's memory, load the
tokenizer and the base model on ``launch.device``, attach LoRA and train
(:func:`lalora.finetune.train`) under the run's fingerprint (the model card, the schedule, the
data and the stage's code: :func:`lalora.provenance.code_fingerprint`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from lalora.adapters import attach_lora
from lalora.classifier import answer_token_ids
from lalora.config import Params
from lalora.data import DataError, Split, read_split
from lalora.devices import module_device, peak_bytes, peak_host_bytes, resolve
from lalora.distributed import Dist, current
from lalora.finetune import TrainResult, train
from lalora.pipeline import fingerprint, guard_memory, measure
from lalora.zoo import load_base_model, load_tokenizer


@dataclass(frozen=True)
class Finetuned:
    """The trained PEFT ``model`` (eval mode, on ``launch.device``), its ``tokenizer``, the
    training split and :func:`lalora.finetune.train`'s result."""

    tokenizer: object
    model: nn.Module
    split: Split
    result: TrainResult


def finetune(
    params: Params, model_name: str, train_path: Path, out: Path, code: str,
    seed: int | None = None, stage: str = "finetune", dist: Dist | None = None,
    aside: Path | None = None,
) -> Finetuned:  # fmt: skip
    """Fine-tune ``model_name`` on the prepared split ``train_path`` as ``params.finetune``
    says, with ``seed`` in place of ``finetune.seed`` when given (LoRA initialisation, batch
    order, dropout), checkpointing into ``out`` (resumed when the fingerprint matches; ``aside``:
    where other runs are moved, :func:`lalora.finetune.train`). ``code``: the stage's code
    fingerprint; ``stage``: whose memory estimate to check (``finetune`` or ``members``)."""
    d = dist or current()
    cfg = params.finetune if seed is None else replace(params.finetune, seed=seed)
    card = params.card(model_name)
    split = read_split(train_path)
    if not split.examples:
        raise DataError(f"{train_path}: no training examples; check data.* in params.yaml")
    tok = load_tokenizer(card)
    _, longest = measure(tok, split.examples, cfg.max_length, f"{stage} {train_path}")
    guard_memory(params, model_name, stage, tok, split.examples, len(split.answers),
                 tokens=longest)  # fmt: skip
    base = load_base_model(card, len(tok), seed=cfg.seed, device=resolve(params.launch.device))
    model = attach_lora(base, card, seed=cfg.seed)
    result = train(
        model, tok, list(split.examples),
        answer_token_ids(tok, split.answers, [e.prompt for e in split.examples]),
        cfg, out, fingerprint(card, cfg, train_path, code), progress=d.main, dist=d, aside=aside,
    )  # fmt: skip
    return Finetuned(tok, model, split, result)


def usage(run: Finetuned, dist: Dist | None = None) -> dict:
    """What the fine-tune cost, for the stage's metrics file: the steps this process ran (0 when
    every step was resumed from checkpoints), their wall time, seconds per step and CPU
    seconds (:class:`lalora.finetune.TrainResult`), and the
    peak memory: the process's resident set (host) and, on CUDA, the device's allocations, both
    in GiB, of rank 0 under ``torchrun`` (``processes`` says how many ran)."""
    d = dist or current()
    res = run.result
    device = module_device(run.model)
    gpu = peak_bytes(device)
    return {
        "steps_run": res.steps_run,
        "wall_s": round(res.seconds, 3),
        "s_per_step": round(res.seconds / res.steps_run, 4) if res.steps_run else None,
        "cpu_s": round(res.cpu_seconds, 3),
        "peak_host_gb": round(peak_host_bytes() / 2**30, 3),
        "peak_gpu_gb": None if gpu is None else round(gpu / 2**30, 3),
        "device": str(device),
        "processes": d.world,
    }
