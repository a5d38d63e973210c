"""Data parallelism on ``torch.distributed`` for the heavy stages (``torchrun``; see
:mod:`lalora.scale.launch`).

A stage started by ``torchrun --nproc-per-node N`` finds ``RANK``/``WORLD_SIZE`` in its
environment; :func:`init` joins the process group (``gloo`` on CPU, ``nccl`` on CUDA, or
``$LALORA_BACKEND``). Work is split in contiguous shards (:func:`shard`), so gathering the
per-rank results in rank order (:func:`gather_cat`) restores the original order. Started by
plain ``python``, everything here is the identity and no process group exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where a collective or a device is used
    import torch
    from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's ``rank`` among ``world`` processes; ``main`` (rank 0) writes outputs;
    ``active`` when the collectives run (several processes, or a group of one)."""

    rank: int = 0
    world: int = 1
    grouped: bool = False  # in a process group even when alone in it (a 1-GPU NCCL check)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.grouped


SINGLE = Dist()


def default_backend() -> str:
    """``$LALORA_BACKEND`` if set, else ``nccl`` where CUDA is available, else ``gloo``."""
    import torch

    if os.environ.get("LALORA_BACKEND"):
        return os.environ["LALORA_BACKEND"]
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_backend(backend: str) -> None:
    """NCCL runs on CUDA GPUs only: refuse it, naming the key, where there is none."""
    import torch

    if backend == "nccl" and not torch.cuda.is_available():
        from lalora.config import ConfigError

        raise ConfigError(
            "launch.backend is nccl, and this machine has no CUDA GPU: use launch.backend auto "
            "(gloo on the CPU) or gloo"
        )


def init() -> Dist:
    """Join the process group that ``torchrun`` set up (once); :data:`SINGLE` without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = default_backend()
        check_backend(backend)
        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def current() -> Dist:
    """The running process's :class:`Dist` (no group joined: :data:`SINGLE`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(rank=dist.get_rank(), world=dist.get_world_size(), grouped=True)
    return SINGLE


def bounds(n: int, d: Dist) -> tuple[int, int]:
    """``[lo, hi)``: rank ``d.rank``'s contiguous share of ``n`` items (sizes differ by <= 1)."""
    base, extra = divmod(n, d.world)
    lo = d.rank * base + min(d.rank, extra)
    return lo, lo + base + (d.rank < extra)


def shard(items: list[T], d: Dist, what: str = "batches", allow_empty: bool = False) -> list[T]:
    """This rank's contiguous share of ``items``; every rank must get at least one unless
    ``allow_empty`` (then the last ranks may get none when there are fewer items than ranks)."""
    if len(items) < d.world and not allow_empty:
        from lalora.config import ConfigError

        raise ConfigError(
            f"{len(items)} {what} for {d.world} processes: every process needs at least one "
            "(lower launch.nproc_per_node or the batch size)"
        )
    lo, hi = bounds(len(items), d)
    return items[lo:hi]


def _device(d: Dist) -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: Tensor, d: Dist) -> Tensor:
    """Sum ``t`` over the ranks, in place (on the backend's device and back)."""
    if not d.active:
        return t
    import torch.distributed as dist

    dev = _device(d)
    buf = t.to(dev)
    dist.all_reduce(buf)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def all_reduce_sum(x: float, d: Dist) -> float:
    """The float64 sum of a number over the ranks."""
    import torch

    return float(all_reduce_(torch.tensor([x], dtype=torch.float64), d)[0])


def all_gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled through the process group)."""
    if not d.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def gather_cat(t: Tensor | None, d: Dist, dim: int = 0) -> Tensor:
    """The ranks' ``t`` (one shard each; None for an empty shard) concatenated in rank order on
    every rank: with :func:`shard`, the original order."""
    import torch

    if not d.active:
        if t is None:
            raise ValueError("nothing to gather")
        return t
    parts = [x for x in all_gather_objects(None if t is None else t.cpu(), d) if x is not None]
    return torch.cat(parts, dim=dim)


def cat_or_none(parts: list[Tensor]) -> Tensor | None:
    """``torch.cat(parts)``, None for an empty shard (see :func:`gather_cat`)."""
    import torch

    return torch.cat(parts) if parts else None


def map_batches(fn: Callable[[int, T], Tensor], items: list[T], d: Dist) -> Tensor:
    """``fn(index, item)`` (per-example rows) over this rank's contiguous share of ``items``,
    ``index`` being the item's position in ``items`` (for per-batch seeds that do not depend
    on the split); every rank returns the rows of all items, in order. A rank may get none."""
    lo = bounds(len(items), d)[0]
    mine = shard(items, d, allow_empty=True)
    return gather_cat(cat_or_none([fn(lo + i, x) for i, x in enumerate(mine)]), d)


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def finish(d: Dist) -> None:
    """Leave the process group (end of a stage)."""
    if d.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
