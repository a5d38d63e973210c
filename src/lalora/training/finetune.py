"""LoRA fine-tuning with checkpoints that resume exactly.

Loss: cross-entropy over the answer-token logits at the last prompt position (method.md
section 1), mean over the batch. AdamW, linear schedule (optional warm-up), seeded; with
``finetune.lora_plus_ratio`` != 1, LoRA+'s two learning rates (:func:`parameter_groups`).

Checkpoint layout (``{out}/step-{N}/``), written to a staging folder and renamed into place:
- ``adapter/``: a standard PEFT adapter folder (``adapter_config.json``, safetensors weights);
- ``trainer.safetensors``: AdamW moments and the torch RNG state (no pickle anywhere);
- ``trainer.json``: step, scheduler and optimizer hyperparameters, the run fingerprint, losses.

A run is identified by a fingerprint of everything that determines its result (the stage
computes it from the model card, the schedule, the data, the code and the library versions:
:func:`lalora.core.provenance.code_fingerprint`). A folder that holds another run is moved aside
whole (``{aside}/{out.name}.stale-<fingerprint>``, printed), never deleted, so a resumed run never
mixes two configurations. ``trainer.json`` records the sha256 of every other file of its
checkpoint; a checkpoint that does not load (a truncated file) or whose files differ from what was
saved (edited or replaced by hand) is moved aside with every later one
(``{aside}/{out.name}.rejected/``, printed, with a warning naming the file) and training resumes
from the last intact checkpoint before it, so no result ever comes from weights this program did
not write. Staging folders of a killed save are removed on start. A non-finite loss or weight
stops the run, naming the step, before anything is saved.

Data parallel (:mod:`lalora.runtime.distributed`, N processes under ``torchrun``): every rank
tokenises the whole global batch of :func:`batch_indices` (so padding is that of the 1-process run)
and takes its contiguous share of the rows; the loss is the global mean (each rank's sum divided by
the global batch size) and the LoRA gradients are summed over the ranks before the AdamW step,
so every rank holds the same weights and the result equals the 1-process run's to float32
round-off. The LoRA dropout masks are drawn per example from a generator keyed by (seed, step,
position in the global batch, module) (:class:`KeyedDropout`), so they do not depend on N
either, and any other randomness is reseeded at each step from (seed, step, first row of the
rank's share): a run resumes exactly, and may resume with another N. Rank 0 alone writes
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lalora.config import FinetuneConfig
from lalora.core.errors import ArtifactError, NonFiniteError
from lalora.core.io import clean_staging, publish_dir, staging_dir
from lalora.data.files import Example
from lalora.models.classifier import Batch, answer_logits, encode
from lalora.runtime.distributed import (
    Dist,
    all_gather_objects,
    all_reduce_,
    barrier,
    bounds,
    current,
)

# what a checkpoint means; checkpoints of another version are moved aside, never resumed from.
# 2: LoRA dropout masks keyed per example (KeyedDropout), randomness reseeded per step
# 3: trainer.json records the sha256 of the checkpoint's other files
FORMAT_VERSION = 3


@dataclass(frozen=True)
class TrainResult:
    """Per-step training losses ``[(step, loss)]``, the checkpoint folders written, the steps
    this call ran (the rest were resumed from checkpoints), their wall time in seconds
    (checkpoint saves included) and the CPU seconds this process spent on them (every thread's;
    unlike the wall time, it hardly changes when other jobs share the cores)."""

    losses: list[tuple[int, float]]
    checkpoints: list[Path]
    steps_run: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


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


def parameter_groups(model: nn.Module, lr: float, ratio: float = 1.0) -> list[dict]:
    """AdamW's parameter groups of ``model``'s trainable weights. ``ratio`` 1: one group at
    ``lr`` (plain LoRA). Otherwise LoRA+ (Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank
    Adaptation of Large Models"): the A maps (and any other trainable weight) at ``lr``, then
    the B maps (``lora_B``) at ``ratio * lr``; each group in the model's parameter order, so a
    checkpoint's optimizer state resumes into the same groups."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if ratio == 1:
        return [{"params": [p for _, p in named], "lr": lr}]
    b = [p for n, p in named if ".lora_B." in n]
    if not b:
        raise ValueError("finetune.lora_plus_ratio needs LoRA B maps (lora_B); the model has none")
    return [
        {"params": [p for n, p in named if ".lora_B." not in n], "lr": lr},
        {"params": b, "lr": ratio * lr},
    ]


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
        "files": file_digests(tmp),
    }
    (tmp / "trainer.json").write_text(json.dumps(meta))
    publish_dir(tmp, final)
    return final


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint folder does not load; training resumes from an earlier one."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(ckpt: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a checkpoint folder but ``trainer.json``."""
    return {
        p.relative_to(ckpt).as_posix(): _sha256(p)
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p != ckpt / "trainer.json"
    }


def verify_checkpoint(ckpt: Path, recorded: dict[str, str]) -> None:
    """The files of ``ckpt`` must be exactly those whose sha256 ``trainer.json`` recorded at
    save time; else an :class:`ArtifactError` naming the first file that differs."""
    found = file_digests(ckpt)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            problem = "missing (the checkpoint lists it)"
        elif name not in recorded:
            problem = "not written by finetune (added after the save)"
        elif found[name] != recorded[name]:
            problem = (
                f"its contents differ from those saved (sha256 {found[name][:12]}, saved "
                f"{recorded[name][:12]}): edited or replaced after training"
            )
        else:
            continue
        raise ArtifactError(ckpt / name, problem, "finetune")


def read_checkpoint(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``trainer.json``, ``trainer.safetensors`` and the adapter weights of one checkpoint,
    verified against the sha256 recorded at save time; an unreadable, edited or replaced file
    raises :class:`ArtifactError` naming it."""
    meta_path = ckpt / "trainer.json"
    try:
        meta = json.loads(meta_path.read_text())
        for key in ("step", "fingerprint", "optimizer", "scheduler", "losses", "files"):
            meta[key]  # a presence check
        if not isinstance(meta["files"], dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(
            meta_path, f"unreadable ({type(err).__name__}: {err})", "finetune"
        ) from None
    tensors = _load_safetensors(ckpt / "trainer.safetensors")
    if "rng.torch" not in tensors:
        raise ArtifactError(ckpt / "trainer.safetensors", "no 'rng.torch' entry", "finetune")
    adapter = _load_safetensors(ckpt / "adapter" / "adapter_model.safetensors")
    verify_checkpoint(ckpt, meta["files"])
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


def move_aside(out: Path, name: str, into: Path | None = None) -> Path:
    """Rename ``out`` to a free ``{into}/{name}[-k]`` (``into``: ``out``'s folder); returns it."""
    parent = out.parent if into is None else into
    parent.mkdir(parents=True, exist_ok=True)
    dest = parent / name
    k = 1
    while dest.exists():
        k += 1
        dest = parent / f"{name}-{k}"
    os.replace(out, dest)
    return dest


def latest_checkpoint(out: Path, fingerprint: str, aside: Path | None = None) -> int | None:
    """The step to resume this run from: its last checkpoint in ``out`` such that it and every
    earlier one load and match their recorded sha256; None to start afresh.

    A folder holding checkpoints of another run (another fingerprint or format) is moved aside
    whole into ``aside`` (default: ``out``'s folder), and the move printed. The first checkpoint
    of this run that fails to load or verify is moved, with every later one, into
    ``{aside}/{out.name}.rejected/``, with a :class:`CorruptCheckpointWarning` naming the file;
    training rewrites them from the last intact one.
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
        dest = move_aside(out, f"{out.name}.stale-{old}", aside)
        print(
            f"finetune: {out} holds checkpoints of another configuration (run {old}); "
            f"moved it to {dest} (delete it when no longer needed)",
            file=sys.stderr,
        )
        return None
    steps = sorted(found)
    last = None
    for i, step in enumerate(steps):
        try:
            read_checkpoint(checkpoint_dir(out, step))
        except ArtifactError as err:
            rejected = (out.parent if aside is None else aside) / f"{out.name}.rejected"
            moved = [move_aside(checkpoint_dir(out, s), f"step-{s}", rejected) for s in steps[i:]]
            again = "from scratch" if last is None else f"from step {last}"
            warnings.warn(
                f"rejected checkpoint step {step}: {err}; moved it and the {len(moved) - 1} "
                f"later one(s) to {rejected} (delete them when no longer needed); training "
                f"again {again}",
                CorruptCheckpointWarning,
                stacklevel=2,
            )
            break
        last = step
    return last


def mix(*parts: int) -> int:
    """A seed from integers: Python's tuple hash (deterministic for ints in every process,
    unlike str hashes), made non-negative."""
    return hash(parts) & (2**63 - 1)


class KeyedDropout(nn.Module):
    """Inverted dropout whose mask for row b of the input (B, ...) is drawn from a generator
    seeded by ``mix(keys[b], index)``: a function of the row's key and the module, not of the
    other rows of the batch (so a batch split over processes gets the 1-process masks)."""

    def __init__(self, p: float, index: int):
        super().__init__()
        self.p, self.index = p, index
        self.keys: list[int] | None = None
        self._gen: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.keys is None or len(self.keys) != x.shape[0]:
            raise RuntimeError("KeyedDropout: set one key per row before the forward pass")
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device)
        masks = []
        for key in self.keys:
            self._gen.manual_seed(mix(key, self.index))
            masks.append(
                torch.empty(x.shape[1:], device=x.device).bernoulli_(
                    1 - self.p, generator=self._gen
                )
            )
        return x * torch.stack(masks).to(x.dtype) / (1 - self.p)


@contextmanager
def keyed_dropout(model: nn.Module) -> Iterator[list[KeyedDropout]]:
    """Swap each LoRA dropout (``nn.Dropout`` with p > 0 in a PEFT ``lora_dropout``) for a
    :class:`KeyedDropout` for the duration; the originals are put back after."""
    swapped = []
    for mod in model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key, drop in list(drops.items()):
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    new = KeyedDropout(drop.p, len(swapped))
                    new.train(drop.training)
                    drops[key] = new
                    swapped.append((drops, key, drop, new))
    try:
        yield [s[3] for s in swapped]
    finally:
        for drops, key, drop, new in swapped:
            drop.train(new.training)
            drops[key] = drop


def _rows(batch: Batch, lo: int, hi: int) -> Batch:
    return Batch(batch.input_ids[lo:hi], batch.attention_mask[lo:hi], batch.labels[lo:hi])


def _sum_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """All-reduce (sum) the gradients of ``params`` over the ranks, as one flat buffer."""
    if not d.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]), d)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _step(
    task: Task,
    cfg: FinetuneConfig,
    step: int,
    rows: tuple[int, int],
    dropouts: list[KeyedDropout],
) -> torch.Tensor:
    """This rank's part of the loss of (0-based) ``step``: the sum of the cross-entropies of the
    global batch's ``rows`` [lo, hi), divided by the global batch size."""
    lo, hi = rows
    examples = task.examples
    torch.manual_seed(mix(cfg.seed, step, lo))
    idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
    batch = encode(
        task.tokenizer,
        [examples[i].prompt for i in idx],
        [examples[i].label for i in idx],
        cfg.max_length,
        cuts=[examples[i].cut for i in idx],
        device=next(task.model.parameters()).device,
    )
    for drop in dropouts:
        drop.keys = [mix(cfg.seed, step, j) for j in range(lo, hi)]
    part = _rows(batch, lo, hi)
    logits = answer_logits(task.model, part, task.answer_ids)  # (b, C)
    return nn.functional.cross_entropy(logits, part.labels, reduction="sum") / len(idx)


def _resume(model, opt, sched, out: Path, fingerprint: str, aside: Path | None, seed: int, d: Dist):
    """The step to start from and the losses so far: the last intact checkpoint of this run in
    ``out`` (its weights, optimizer, schedule and RNG state restored), else step 0 (saved)."""
    from peft import set_peft_model_state_dict

    # rank 0 inspects (and tidies) the folder; the others take its answer
    start = all_gather_objects(latest_checkpoint(out, fingerprint, aside) if d.main else None, d)[0]
    if start is None:
        torch.manual_seed(seed)
        if d.main:
            save_checkpoint(out, 0, model, opt, sched, fingerprint, [])
        barrier(d)
        return 0, []
    meta, tensors, adapter = read_checkpoint(checkpoint_dir(out, start))
    set_peft_model_state_dict(model, adapter)
    _load_optimizer(opt, tensors, meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return start, [(int(s), float(v)) for s, v in meta["losses"]]


def divergence_advice(cfg: FinetuneConfig) -> str:
    """What to lower after a diverged step: the learning rate, and under LoRA+ the ratio that
    multiplies it for every B matrix."""
    if cfg.lora_plus_ratio == 1:
        return "Lower finetune.lr."
    return (
        f"Lower finetune.lora_plus_ratio (LoRA+: every B matrix learns at {cfg.lora_plus_ratio:g}"
        f" x lr = {cfg.lora_plus_ratio * cfg.lr:g}) or finetune.lr."
    )


def _checked_update(model, opt, sched, loss: torch.Tensor, params: list, step: int, saved: int,
                    cfg: FinetuneConfig, d: Dist) -> float:  # fmt: skip
    """One AdamW update from this rank's ``loss`` (gradients summed over the ranks); returns the
    global loss. A non-finite loss (before the update) or weight (after it) raises
    NonFiniteError naming the (0-based) ``step`` and the last checkpoint ``saved``."""
    total = all_reduce_(loss.detach().double().reshape(1), d)[0]
    if not torch.isfinite(total):
        raise NonFiniteError(
            f"finetune: the loss is {float(total)} at step {step + 1} (lr {cfg.lr:g}); "
            f"the run diverged, the last checkpoint saved is step {saved}. "
            + divergence_advice(cfg)
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _sum_gradients(params, d)
    opt.step()
    sched.step()
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
    if bad:
        raise NonFiniteError(
            f"finetune: non-finite weights in {bad[0]} (and {len(bad) - 1} more) after "
            f"step {step + 1} (lr {cfg.lr:g}); the last checkpoint saved is step {saved}. "
            + divergence_advice(cfg)
        )
    return float(total)


@dataclass(frozen=True)
class Task:
    """What is learned: a PEFT ``model`` (its trainable parameters the LoRA weights), its
    ``tokenizer``, the training ``examples`` and the C answer tokens' ids ``answer_ids``."""

    model: nn.Module
    tokenizer: Any
    examples: list[Example]
    answer_ids: list[int]


@dataclass(frozen=True)
class RunContext:
    """Where and how a fine-tuning run is kept: the checkpoint folder ``out``, resumed from its
    last checkpoint written by a run with the same ``fingerprint``; ``aside``, where runs of
    another fingerprint and rejected checkpoints are moved (default: ``out``'s folder; it must
    lie outside any DVC output that ``out`` is part of); the process group ``dist`` (default:
    the running one; each rank needs a row per batch); a progress bar; ``on_step``, called with
    the step number after each completed step (tests interrupt a run)."""

    out: Path
    fingerprint: str
    aside: Path | None = None
    dist: Dist | None = None
    progress: bool = True
    on_step: Callable[[int], None] | None = None


def train(task: Task, cfg: FinetuneConfig, run: RunContext) -> TrainResult:
    """Fine-tune the LoRA weights of ``task.model`` on ``task.examples`` on the schedule
    ``cfg``, checkpointing as ``run`` says (:class:`RunContext`).

    Returns:
        The losses of every step and the checkpoint folders of ``cfg.checkpoints``.
    """
    from transformers import get_linear_schedule_with_warmup

    d = run.dist or current()
    rows = bounds(cfg.batch_size, d) if d.world <= cfg.batch_size else None
    if rows is None:
        raise ValueError(
            f"finetune.batch_size {cfg.batch_size} is smaller than the {d.world} processes; "
            "every process needs at least one example per step"
        )
    model = task.model
    groups = parameter_groups(model, cfg.lr, cfg.lora_plus_ratio)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    start, losses = _resume(model, opt, sched, run.out, run.fingerprint, run.aside, cfg.seed, d)
    model.train()
    began, cpu = time.perf_counter(), time.process_time()
    _loop(task, cfg, run, d, rows, (opt, sched), start, losses)
    model.eval()
    return TrainResult(
        losses=losses,
        checkpoints=[checkpoint_dir(run.out, s) for s in cfg.checkpoints],
        steps_run=cfg.steps - start,
        seconds=time.perf_counter() - began,
        cpu_seconds=time.process_time() - cpu,
    )


def _loop(task: Task, cfg: FinetuneConfig, run: RunContext, d: Dist, rows: tuple[int, int],
          optim, start: int, losses: list[tuple[int, float]]) -> None:  # fmt: skip
    """Steps ``start`` .. ``cfg.steps`` - 1: each step's loss appended to ``losses``, a
    checkpoint every ``cfg.save_every`` steps (written by rank 0, the others waiting)."""
    opt, sched = optim
    params = [p for p in task.model.parameters() if p.requires_grad]
    saved = start  # the last checkpoint written
    bar = tqdm(range(start, cfg.steps), desc="finetune", disable=not run.progress or not d.main,
               initial=start, total=cfg.steps)  # fmt: skip
    with keyed_dropout(task.model) as dropouts:
        for step in bar:
            loss = _step(task, cfg, step, rows, dropouts)
            losses.append((step + 1, _checked_update(task.model, opt, sched, loss, params, step,
                                                     saved, cfg, d)))  # fmt: skip
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            if (step + 1) % cfg.save_every == 0:
                if d.main:
                    save_checkpoint(run.out, step + 1, task.model, opt, sched, run.fingerprint,
                                    losses)  # fmt: skip
                barrier(d)
                saved = step + 1
            if run.on_step is not None:
                run.on_step(step + 1)
