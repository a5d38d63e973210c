"""LoRA fine-tuning with checkpoints that resume exactly.

Loss: cross-entropy over the answer-token logits at the last prompt position (method.md
section 1), mean over the batch. AdamW, linear schedule (optional warm-up), seeded.

Checkpoint layout (``{out}/step-{N}/``), written to a staging folder and renamed into place:
- ``adapter/``: a standard PEFT adapter folder (``adapter_config.json``, safetensors weights);
- ``trainer.safetensors``: AdamW moments and the torch RNG state (no pickle anywhere);
- ``trainer.json``: step, scheduler and optimizer hyperparameters, the run fingerprint, losses.

A run is identified by a fingerprint of everything that determines its result; a folder with a
different fingerprint is cleared, so a resumed run never mixes two configurations.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lalora.config import FinetuneConfig
from lalora.data import Example
from lalora.io import publish_dir, staging_dir
from lalora.models import answer_logits, encode

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainResult:
    """Per-step training losses ``[(step, loss)]`` and the checkpoint folders written."""

    losses: list[tuple[int, float]]
    checkpoints: list[Path]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of (0-based) ``step``: consecutive slices of seeded per-epoch permutations.

    A pure function of ``step``, so a resumed run sees the same batches as an uninterrupted one.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        out += perm[offset : offset + batch_size - len(out)]
    return out


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"step-{step}"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{idx}.{key}"] = torch.as_tensor(value).clone()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    fingerprint: str,
    losses: list[tuple[int, float]],
) -> Path:
    """Write ``{out}/step-{step}`` atomically."""
    final = checkpoint_dir(out, step)
    tmp = staging_dir(final)
    model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
    tensors, opt_meta = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "trainer.safetensors"))
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "fingerprint": fingerprint,
        "optimizer": opt_meta,
        "scheduler": sched.state_dict(),
        "losses": losses,
    }
    (tmp / "trainer.json").write_text(json.dumps(meta))
    publish_dir(tmp, final)
    return final


def latest_checkpoint(out: Path, fingerprint: str) -> int | None:
    """The last complete checkpoint step of this run, or None (clearing a foreign run's folder)."""
    if not out.exists():
        return None
    steps = []
    for path in out.glob("step-*/trainer.json"):
        meta = json.loads(path.read_text())
        if meta.get("fingerprint") != fingerprint or meta.get("format_version") != FORMAT_VERSION:
            shutil.rmtree(out)
            return None
        steps.append(int(meta["step"]))
    return max(steps) if steps else None


def _adapter_state(model: nn.Module, adapter: Path) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))


def train(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    answer_ids: list[int],
    cfg: FinetuneConfig,
    out: Path,
    fingerprint: str,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune the LoRA weights of ``model`` (a PEFT model), checkpointing into ``out``.

    Resumes from the last checkpoint in ``out`` written by a run with the same ``fingerprint``.
    ``on_step(step)`` is called after each completed step (tests use it to interrupt a run).
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    losses: list[tuple[int, float]] = []
    start = latest_checkpoint(out, fingerprint)
    if start is None:
        torch.manual_seed(cfg.seed)
        save_checkpoint(out, 0, model, opt, sched, fingerprint, losses)
        start = 0
    else:
        ckpt = checkpoint_dir(out, start)
        meta = json.loads((ckpt / "trainer.json").read_text())
        tensors = load_file(str(ckpt / "trainer.safetensors"))
        _adapter_state(model, ckpt / "adapter")
        _load_optimizer(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        losses = [(int(s), float(v)) for s, v in meta["losses"]]

    model.train()
    bar = tqdm(
        range(start, cfg.steps),
        desc="finetune",
        disable=not progress,
        initial=start,
        total=cfg.steps,
    )
    for step in bar:
        idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        batch = encode(
            tokenizer,
            [examples[i].prompt for i in idx],
            [examples[i].label for i in idx],
            cfg.max_length,
        )
        logits = answer_logits(model, batch, answer_ids)  # (B, C)
        loss = nn.functional.cross_entropy(logits, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append((step + 1, float(loss)))
        bar.set_postfix(loss=f"{float(loss):.3f}")
        if (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, step + 1, model, opt, sched, fingerprint, losses)
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return TrainResult(losses=losses, checkpoints=[checkpoint_dir(out, s) for s in cfg.checkpoints])
