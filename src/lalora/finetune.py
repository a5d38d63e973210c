"""LoRA fine-tuning with checkpoints that resume exactly.

Loss: cross-entropy over the answer-token logits at the last prompt position (method.md
section 1), mean over the batch. AdamW, linear schedule (optional warm-up), seeded.

Checkpoint layout (``{out}/step-{N}/``), written to a staging folder and renamed into place:
- ``adapter/``: a standard PEFT adapter folder (``adapter_config.json``, safetensors weights);
- ``trainer.safetensors``: AdamW moments and the torch RNG state (no pickle anywhere);
- ``trainer.json``: step, scheduler and optimizer hyperparameters, the run fingerprint, losses.

A run is identified by a fingerprint of everything that determines its result. A folder that
holds another run is moved aside whole (``{out}.stale-<fingerprint>``, printed), never deleted,
so a resumed run never mixes two configurations. A checkpoint that does not load (a truncated
file) is skipped with a warning and training resumes from the last intact one; staging folders
of a killed save are removed on start. A non-finite loss or weight stops the run, naming the
step, before anything is saved.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lalora.config import FinetuneConfig
from lalora.data import Example
from lalora.errors import ArtifactError, NonFiniteError
from lalora.io import clean_staging, publish_dir, staging_dir
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


def _sort_target_modules(path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes with the process's
    hash seed; sorted, the same run writes the same bytes (and DVC sees no change)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


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
    _sort_target_modules(tmp / "adapter" / "adapter_config.json")
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


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint folder does not load; training resumes from an earlier one."""


def read_checkpoint(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``trainer.json``, ``trainer.safetensors`` and the adapter weights of one checkpoint; an
    unreadable file raises :class:`ArtifactError` naming it."""
    meta_path = ckpt / "trainer.json"
    try:
        meta = json.loads(meta_path.read_text())
        for key in ("step", "fingerprint", "optimizer", "scheduler", "losses"):
            meta[key]  # a presence check
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(
            meta_path, f"unreadable ({type(err).__name__}: {err})", "finetune"
        ) from None
    tensors = _load_safetensors(ckpt / "trainer.safetensors")
    if "rng.torch" not in tensors:
        raise ArtifactError(ckpt / "trainer.safetensors", "no 'rng.torch' entry", "finetune")
    adapter = _load_safetensors(ckpt / "adapter" / "adapter_model.safetensors")
    return meta, tensors, adapter


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError, OSError: truncated, missing or not safetensors
        raise ArtifactError(path, f"unreadable ({type(err).__name__}: {err})", "finetune") from None


def _fingerprint_of(ckpt: Path) -> tuple[str, int] | None:
    """(fingerprint, format version) from a checkpoint's trainer.json, None if unreadable."""
    try:
        meta = json.loads((ckpt / "trainer.json").read_text())
        return str(meta["fingerprint"]), int(meta["format_version"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def move_aside(out: Path, fingerprint: str) -> Path:
    """Rename ``out`` to a free ``{out}.stale-<fingerprint>[-k]`` next to it; returns it."""
    dest = out.with_name(f"{out.name}.stale-{fingerprint}")
    k = 1
    while dest.exists():
        k += 1
        dest = out.with_name(f"{out.name}.stale-{fingerprint}-{k}")
    os.replace(out, dest)
    return dest


def latest_checkpoint(out: Path, fingerprint: str) -> int | None:
    """The last intact checkpoint step of this run in ``out``, or None.

    A folder holding checkpoints of another run (another fingerprint or format) is moved aside
    whole, and the move printed. A checkpoint of this run that does not load is skipped with a
    :class:`CorruptCheckpointWarning` (it is rewritten when training reaches its step again).
    """
    if not out.exists():
        return None
    for path in clean_staging(out, "step-[0-9]*"):
        print(f"finetune: removed {path}, left by an interrupted checkpoint save", file=sys.stderr)
    found = {}
    for ckpt in out.glob("step-*"):
        name = ckpt.name.removeprefix("step-")
        if ckpt.is_dir() and name.isdigit():
            found[int(name)] = _fingerprint_of(ckpt)
    foreign = {
        fp for fp in found.values() if fp is not None and fp != (fingerprint, FORMAT_VERSION)
    }
    if foreign:
        old = sorted(foreign)[0][0]
        dest = move_aside(out, old)
        print(
            f"finetune: {out} holds checkpoints of another configuration (run {old}); "
            f"moved it to {dest} (delete it when no longer needed)",
            file=sys.stderr,
        )
        return None
    for step in sorted(found, reverse=True):
        try:
            read_checkpoint(checkpoint_dir(out, step))
            return step
        except ArtifactError as err:
            warnings.warn(
                f"skipping checkpoint step {step}: {err}", CorruptCheckpointWarning, stacklevel=2
            )
    return None


def _adapter_state(model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, adapter)


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
        meta, tensors, adapter = read_checkpoint(checkpoint_dir(out, start))
        _adapter_state(model, adapter)
        _load_optimizer(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        losses = [(int(s), float(v)) for s, v in meta["losses"]]

    saved = start
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
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"finetune: the loss is {float(loss)} at step {step + 1} (lr {cfg.lr:g}); the run "
                f"diverged, the last checkpoint saved is step {saved}. Lower finetune.lr."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
        if bad:
            raise NonFiniteError(
                f"finetune: non-finite weights in {bad[0]} (and {len(bad) - 1} more) after step "
                f"{step + 1} (lr {cfg.lr:g}); the last checkpoint saved is step {saved}. Lower "
                "finetune.lr."
            )
        losses.append((step + 1, float(loss)))
        bar.set_postfix(loss=f"{float(loss):.3f}")
        if (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, step + 1, model, opt, sched, fingerprint, losses)
            saved = step + 1
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return TrainResult(losses=losses, checkpoints=[checkpoint_dir(out, s) for s in cfg.checkpoints])
