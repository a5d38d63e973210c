"""The study's fine-tuning recipe, one place for the ``finetune`` stage and the deep ensemble's
members: read the prepared train split, estimate and check the stage's memory, load the
tokenizer and the base model on ``launch.device``, attach LoRA and train
(:func:`lalora.training.finetune.train`) under the run's fingerprint (the model card, the schedule,
the data and the stage's code: :func:`lalora.core.provenance.code_fingerprint`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from lalora.config import Params
from lalora.data.files import DataError, Split, read_split
from lalora.models.adapters import attach_lora
from lalora.models.classifier import answer_token_ids
from lalora.models.pipeline import fingerprint, guard_memory, measure
from lalora.models.zoo import load_base_model, load_tokenizer
from lalora.runtime.devices import module_device, peak_bytes, peak_host_bytes, resolve
from lalora.runtime.distributed import Dist, current
from lalora.training.finetune import RunContext, Task, TrainResult, train


@dataclass(frozen=True)
class Finetuned:
    """The trained PEFT ``model`` (eval mode, on ``launch.device``), its ``tokenizer``, the
    training split and :func:`lalora.training.finetune.train`'s result."""

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
    where other runs are moved, :func:`lalora.training.finetune.train`). ``code``: the stage's code
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
    ids = answer_token_ids(tok, split.answers, [e.prompt for e in split.examples])
    result = train(
        Task(model, tok, list(split.examples), ids), cfg,
        RunContext(out, fingerprint(card, cfg, train_path, code), aside, d, progress=d.main),
    )  # fmt: skip
    return Finetuned(tok, model, split, result)


def usage(run: Finetuned, dist: Dist | None = None) -> dict:
    """What the fine-tune cost, for the stage's metrics file: the steps this process ran (0 when
    every step was resumed from checkpoints), their wall time, seconds per step and CPU
    seconds (:class:`lalora.training.finetune.TrainResult`), and the
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
