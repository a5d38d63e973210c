"""Memory the heavy stages will need, estimated from the model card's architecture and the
params before anything large is allocated, so that an impossible setting stops with a message
instead of the kernel's OOM killer or a CUDA out-of-memory error halfway through.

One estimate per stage (:func:`stage_memory`), printed before the model loads and checked, on
the CPU, against ``launch.memory_gb`` or the memory available, and on CUDA, its device part
against the GPU's free memory and its host part against the host's. Parts, for a base model of
W weights of which W_lin lie in its layers' linear maps, LoRA with P weights, L layers of
width h (key-value width h_kv, MLP width i), b prompts of ``finetune.max_length`` T per batch:

- base weights: W x the dtype's bytes; with nf4, W_lin x 4.127 bits (4-bit NF4 codes, one
  8-bit scale per 64 weights, one float32 scale per 256 of those) and the rest (embeddings,
  ``lm_head``, norms) in the dtype;
- LoRA weights, float32 (PEFT keeps adapters in float32): 4 P bytes; fine-tuning adds their
  gradients and the AdamW moments, 12 P;
- activations kept for the backward pass: b T L (8 h + 2 h_kv + 3 i) x the dtype's bytes (the
  inputs of the norms, projections and MLP maps, the attention output; fused attention keeps no
  T x T scores); the factor fit and the predictive hold them while the C - 1 backward passes
  run;
- Kronecker statistics (:func:`factor_memory`), float64: a side kept dense (d <= ``kfac.max_dense``,
  or ``kfac.rank`` >= d) holds its d x d sum, and its eigendecomposition at the end needs about
  two more; a low-rank side holds d x s (Nystrom: a sketch and its test matrix, s = 2 rank + 10;
  SVD: a root of rank + 64 columns, twice);
- the Jacobians of one batch, b (C - 1) P in float32, and their projections on the kept
  eigenbases, b (C - 1) sum_m k_g k_a in float64; ``tune_prior`` keeps the projections of the
  whole validation split in host memory;
- the Monte Carlo predictive's draws (host): (256, samples, C) float64 normals per chunk of 256
  prompts, with about three more arrays of that size.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field

from lalora.config import (
    EvaluateConfig,
    FinetuneConfig,
    KfacConfig,
    ModelCard,
    Params,
    PredictiveConfig,
)
from lalora.core.errors import UserError

BYTES = 8  # float64
GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # codes, first- and second-level scales


class MemoryLimitError(UserError, MemoryError):
    """A stage would need more memory than the machine (or ``launch.memory_gb``) allows."""


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of a stage's large arrays, by part (``{what: bytes}``), and the params keys
    that change them."""

    parts: dict[str, int]
    keys: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def times(self, processes: int) -> Estimate:
        """The same arrays held by each of ``processes`` processes on this machine."""
        if processes == 1:
            return self
        parts = {f"{k}, x{processes} processes": v * processes for k, v in self.parts.items()}
        return Estimate(parts, (*self.keys, "launch.nproc_per_node"))


def _dense(d: int, cfg: KfacConfig) -> bool:
    """Whether a factor side of size ``d`` is kept dense (as :func:`lalora.laplace.kron.
    make_accumulator` decides)."""
    return d <= cfg.max_dense or cfg.rank >= d


def _side(d: int, cfg: KfacConfig) -> tuple[int, bool]:
    """Bytes held while accumulating one factor side of size ``d``, and whether it is dense."""
    if _dense(d, cfg):
        return d * d * BYTES, True
    cols = 2 * (2 * cfg.rank + 10) if cfg.update == "nystrom" else 2 * (cfg.rank + 64)
    return d * min(d, cols) * BYTES, False


def _shape(module) -> tuple[int, int]:
    return tuple(module) if isinstance(module, tuple) else tuple(module.weight.shape)


# sibling projections that read one input tensor (their LoRA-A maps share an input factor,
# accumulated once: :class:`lalora.laplace.hooks.Tap`)
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_LORA_A = re.compile(r"^(?P<parent>.*)\.(?P<proj>[^.]+)\.lora_A(\.|$)")


def _input_owner(name: str) -> str | None:
    """The key of the input a LoRA-A map shares with its siblings (None: its own)."""
    m = _LORA_A.match(name)
    if m is None:
        return None
    for i, group in enumerate(SHARED_INPUTS):
        if m["proj"] in group:
            return f"{m['parent']}#{i}"
    return None


def _sides(modules: dict):
    """``(name, label, d)`` of every factor side of ``modules`` that is accumulated: the input
    side ``A`` (d_in) and the output-gradient side ``G`` (d_out) of each, an input side that
    sibling projections share once."""
    owners = set()
    for name, module in modules.items():
        d_out, d_in = _shape(module)
        owner = _input_owner(name)
        if owner is None or owner not in owners:
            owners.add(owner)
            yield name, "A", int(d_in)
        yield name, "G", int(d_out)


def factor_memory(modules: dict, cfg: KfacConfig) -> Estimate:
    """Factor fitting of the LoRA ``modules`` (``lalora.models.adapters.lora_modules``, or their
    weight shapes (d_out, d_in) by name) under ``cfg``: every side's accumulator (an input side that
    sibling projections share counted once), plus the largest dense side's
    eigendecomposition."""
    parts, workspace = {}, 0
    for name, label, d in _sides(modules):
        size, dense = _side(d, cfg)
        kind = f"dense {d} x {d}" if dense else f"low-rank {d} x {cfg.rank}"
        parts[f"{name} {label} ({kind})"] = size
        if dense:
            workspace = max(workspace, 2 * size)
    if workspace:
        parts["eigendecomposition of the largest dense side"] = workspace
    return Estimate(parts, ("kfac.rank", "kfac.max_dense", "kfac.update"))


def statistics_bytes(modules: dict, cfg: KfacConfig) -> int:
    """The float64 statistics that data-parallel factor fitting all-reduces once: every dense
    sum (d x d) and Nystrom sketch (d x (2 rank + 10)); an input side that sibling projections
    share counted once. (Incremental-SVD roots are gathered, not summed: counted as d x rank.)"""
    total = 0
    for _, _, d in _sides(modules):
        if _dense(d, cfg):
            total += d * d * BYTES
        else:
            cols = 2 * cfg.rank + 10 if cfg.update == "nystrom" else cfg.rank
            total += d * min(d, cols) * BYTES
    return total


def sampling_memory(n_choices: int, samples: int, link: str, chunk: int = 256) -> Estimate:
    """The Monte Carlo predictive's draws (``link: mc``; probit draws nothing)."""
    size = 4 * chunk * samples * n_choices * BYTES if link == "mc" else 0
    return Estimate({f"predictive samples ({samples} per prompt, {n_choices} choices)": size},
                    ("predictive.samples", "predictive.link"))  # fmt: skip


def available() -> int:
    """Bytes this machine can give now (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check(estimate: Estimate, limit_gb: float, stage: str) -> None:
    """Refuse, before allocating, an ``estimate`` above ``limit_gb`` (0: :func:`available`),
    naming its largest parts and the keys to change."""
    limit = int(limit_gb * GB) if limit_gb > 0 else available()
    if estimate.total <= limit:
        return
    top = [
        kv for kv in sorted(estimate.parts.items(), key=lambda kv: -kv[1])[:3] if kv[1] >= GB / 10
    ]
    detail = "; ".join(f"{what}: {size / GB:.1f} GB" for what, size in top)
    where = f"launch.memory_gb {limit_gb:g}" if limit_gb > 0 else "this machine has available"
    raise MemoryLimitError(
        f"{stage} would need about {estimate.total / GB:.1f} GB ({detail}), more than the "
        f"{limit / GB:.1f} GB {where}. Lower {' or '.join(estimate.keys)}; or, if this "
        "estimate is wrong for your machine, set launch.memory_gb to the memory it may use."
    )


# The paper's models' shapes, for estimates where their config.json is not at hand (the tables
# of docs/scaling.md); keys of transformers' LlamaConfig.
REFERENCE_CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """What an estimate reads of a model: ``weights`` (all, tied ones once), ``linear`` (those
    of the layers' linear maps, which nf4 quantises; not ``lm_head``), ``layers``, ``hidden``,
    ``kv_width`` (key-value heads x head size), ``intermediate`` (MLP width), and the LoRA
    maps' weight shapes (d_out, d_in) by name (``...q_proj.lora_A``)."""

    weights: int
    linear: int
    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    lora: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def lora_params(self) -> int:
        return sum(a * b for a, b in self.lora.values())


def architecture(config, card: ModelCard) -> Architecture:
    """The :class:`Architecture` of a transformers ``config`` with ``card``'s LoRA (rank
    ``card.r`` on ``card.targets`` and ``lm_head`` if adapted), read from the model built on
    the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lalora.models.adapters import _is_linear, lora_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    weights = sum(p.numel() for p in model.parameters())
    linear, lora = 0, {}
    targets = lora_targets(card)
    for name, mod in model.named_modules():
        if not _is_linear(mod):
            continue
        d_out, d_in = mod.weight.shape
        if mod is not out_emb:
            linear += mod.weight.numel()
        if any(name == t or name.endswith("." + t) for t in targets):
            lora[f"{name}.lora_A"] = (card.r, d_in)
            lora[f"{name}.lora_B"] = (d_out, card.r)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Architecture(
        weights=weights, linear=linear, layers=config.num_hidden_layers,
        hidden=config.hidden_size, kv_width=kv * head_dim,
        intermediate=config.intermediate_size, lora=lora,
    )  # fmt: skip


@dataclass(frozen=True)
class StageMemory:
    """A stage's estimated peak: ``device`` (the compute device's memory) and ``host``."""

    stage: str
    device: Estimate
    host: Estimate

    def describe(self, where: str) -> str:
        def parts(e: Estimate, top: int = 4) -> str:
            big = sorted(e.parts.items(), key=lambda kv: -kv[1])
            text = ", ".join(f"{k} {v / GB:.2f}" for k, v in big[:top])
            rest = sum(v for _, v in big[top:])
            return text + (f", {len(big) - top} more {rest / GB:.2f}" if big[top:] else "")

        total = self.device.total / GB
        text = f"{self.stage}: estimated peak {total:.2f} GB on {where} ({parts(self.device)})"
        if self.host.total:
            text += f"; {self.host.total / GB:.2f} GB host memory ({parts(self.host)})"
        return text


def _kept(d: int, cfg: KfacConfig) -> int:
    return d if _dense(d, cfg) else cfg.rank


def _projections(arch: Architecture, cfg: KfacConfig) -> int:
    """Numbers per example and contrast in the projections P_c: sum over modules k_g k_a."""
    return sum(_kept(o, cfg) * _kept(i, cfg) for o, i in arch.lora.values())


@dataclass(frozen=True)
class Sizes:
    """The params sections an estimate reads, and the processes per machine."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    kfac: KfacConfig = field(default_factory=KfacConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predictive: PredictiveConfig = field(default_factory=PredictiveConfig)
    processes: int = 1

    @classmethod
    def of(cls, params: Params) -> Sizes:
        return cls(params.finetune, params.kfac, params.evaluate, params.predictive,
                   params.launch.nproc_per_node)  # fmt: skip


def stage_memory(
    stage: str, arch: Architecture, card: ModelCard, params: Sizes, n_choices: int,
    n_val: int = 0, tokens: int | None = None,
) -> StageMemory:  # fmt: skip
    """The estimated peak memory of ``stage`` (finetune, members, fit_kfac, tune_prior,
    evaluate, shift) for one process: see the module docstring for each part. ``n_val``: the
    validation prompts whose projections ``tune_prior`` keeps; ``tokens``: the longest prompt
    (default ``finetune.max_length``)."""
    b_dtype = DTYPE_BYTES[card.dtype]
    T = min(tokens or params.finetune.max_length, params.finetune.max_length)
    K, P = n_choices - 1, arch.lora_params
    nproc = params.processes
    if card.quantization == "nf4":
        base = arch.linear * NF4_BITS / 8 + (arch.weights - arch.linear) * b_dtype
        what = f"base weights ({card.dtype}, nf4)"
    else:
        base = arch.weights * b_dtype
        what = f"base weights ({card.dtype})"
    device = {what: int(base), "LoRA weights (float32)": 4 * P}
    host: dict[str, int] = {}
    keys: list[str] = []
    per_token = arch.layers * (8 * arch.hidden + 2 * arch.kv_width + 3 * arch.intermediate)
    if stage in ("finetune", "members"):
        b = math.ceil(params.finetune.batch_size / nproc)
        device["LoRA gradients and AdamW moments"] = 12 * P
        keys += ["finetune.batch_size", "finetune.max_length"]
    elif stage == "fit_kfac":
        b = params.kfac.batch_size
        device |= factor_memory(arch.lora, params.kfac).parts
        keys += ["kfac.batch_size", "kfac.rank", "kfac.max_dense", "finetune.max_length"]
    else:
        b = params.evaluate.batch_size
        proj = _projections(arch, params.kfac)
        device[f"Jacobians of one batch ({b} prompts, {K} contrasts)"] = 4 * b * K * P
        device["their projections"] = 8 * b * K * proj
        if stage == "tune_prior" and n_val:
            host[f"projections of {n_val} validation prompts"] = 8 * n_val * K * proj
        pred = params.predictive
        host |= sampling_memory(n_choices, pred.samples, pred.link).parts
        keys += ["evaluate.batch_size", "finetune.max_length", "predictive.samples",
                 "kfac.rank", "kfac.max_dense"]  # fmt: skip
    device[f"activations ({b} x {T} tokens)"] = b * T * per_token * b_dtype
    return StageMemory(stage, Estimate(device, tuple(keys)), Estimate(host, tuple(keys)))


def guard(memory: StageMemory, device, limit_gb: float, processes: int = 1) -> None:
    """Print ``memory`` and refuse (:class:`MemoryLimitError`, naming the keys to change) an
    estimate above what may be used: on the CPU, device and host parts together, for each of
    the ``processes`` on this machine, against ``limit_gb`` (0: the memory available); on
    CUDA, the device part against the GPU's free memory (one GPU per process) and the host
    parts against ``limit_gb`` or the host's available memory."""
    from lalora.runtime.devices import free_bytes

    print(memory.describe(str(device)), file=sys.stderr)
    if getattr(device, "type", "cpu") != "cuda":  # every process in this machine's memory
        both = Estimate({**memory.device.parts, **memory.host.parts}, memory.device.keys)
        return check(both.times(processes), limit_gb, memory.stage)
    check(memory.host.times(processes), limit_gb, memory.stage)
    free = free_bytes(device)
    if memory.device.total > free:
        raise MemoryLimitError(
            f"{memory.stage} would need about {memory.device.total / GB:.1f} GB on {device}, "
            f"which has {free / GB:.1f} GB free ({memory.describe(str(device))}). Lower "
            f"{' or '.join(memory.device.keys)}, or use a card with quantization: nf4."
        )


def stage_table(tokens: tuple[int, ...] = (512, 128), n_val: int = 100) -> str:
    """docs/scaling.md's table: the estimated peak GPU memory (GiB) per stage of LLaMA-2-7B
    and -70B in nf4 (bfloat16 compute), the default params (LoRA r 8 on q_proj, v_proj and
    lm_head; batches of 6 / 8 prompts), two choices, prompts of ``tokens`` tokens and
    ``n_val`` validation prompts."""
    from transformers import LlamaConfig

    card = ModelCard(source="hub", repo="meta-llama", quantization="nf4", dtype="bfloat16")
    stages = ("finetune", "fit_kfac", "tune_prior", "evaluate")
    rows = ["| model | tokens per prompt | " + " | ".join(stages) + " |",
            "|---|---|" + "---|" * len(stages)]  # fmt: skip
    for name in REFERENCE_CONFIGS:
        arch = architecture(LlamaConfig(**REFERENCE_CONFIGS[name]), card)
        for t in tokens:
            cells = [stage_memory(s, arch, card, Sizes(), 2, n_val, t).device.total / GB
                     for s in stages]  # fmt: skip
            rows.append(f"| {name} | {t} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(rows)
