"""Memory the Laplace stages will need, estimated from the params and the model's shapes before
anything large is allocated, so that an impossible setting stops with a message instead of the
kernel's OOM killer.

Per LoRA module with weight (d_out, d_in), the Kronecker factors are A (d_in, d_in) and
G (d_out, d_out), accumulated in float64 (:func:`lalora.laplace.kron.make_accumulator`): a side
kept dense (d <= ``kfac.max_dense``, or ``kfac.rank`` >= d) holds its d x d sum, and its
eigendecomposition at the end needs about two more; a low-rank side holds d x s (Nystrom: a
sketch and its test matrix, s = 2 rank + 10; SVD: a root of rank + 64 columns, twice). The
Monte Carlo predictive draws (256, samples, C) float64 normals per chunk of 256 prompts, with
about three more arrays of that size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lalora.config import KfacConfig
from lalora.errors import UserError

BYTES = 8  # float64
GB = 1024**3


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


def _side(d: int, cfg: KfacConfig) -> tuple[int, bool]:
    """Bytes held while accumulating one factor side of size ``d``, and whether it is dense."""
    if d <= cfg.max_dense or cfg.rank >= d:
        return d * d * BYTES, True
    cols = 2 * (2 * cfg.rank + 10) if cfg.update == "nystrom" else 2 * (cfg.rank + 64)
    return d * min(d, cols) * BYTES, False


def factor_memory(modules: dict[str, nn.Module], cfg: KfacConfig) -> Estimate:
    """Factor fitting of the LoRA ``modules`` (``lalora.models.lora_modules``) under ``cfg``:
    every side's accumulator, plus the largest dense side's eigendecomposition."""
    parts, workspace = {}, 0
    for name, module in modules.items():
        d_out, d_in = module.weight.shape
        for label, d in (("A", d_in), ("G", d_out)):
            size, dense = _side(int(d), cfg)
            kind = f"dense {d} x {d}" if dense else f"low-rank {d} x {cfg.rank}"
            parts[f"{name} {label} ({kind})"] = size
            if dense:
                workspace = max(workspace, 2 * size)
    if workspace:
        parts["eigendecomposition of the largest dense side"] = workspace
    return Estimate(parts, ("kfac.rank", "kfac.max_dense", "kfac.update"))


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
