"""The comparison's baselines: temperature scaling, MC dropout, the checkpoint and deep ensembles.

- Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): the MAP
  logits divided by one temperature T fitted by minimising the validation NLL.
- MC dropout (Gal and Ghahramani 2016): the LoRA dropout kept on at test time, the softmax
  averaged over ``samples`` seeded forward passes.
- Checkpoint ensemble: the MAP predictive probabilities of the last K checkpoints averaged
  (computed from saved predictions, :func:`checkpoint_ensemble`).
- Deep ensemble (Lakshminarayanan et al. 2017): the final MAP predictive probabilities of M
  fine-tuning runs with different seeds averaged (:mod:`lalora.training.members` trains the extra
  ones; the same average, :func:`checkpoint_ensemble`, over runs instead of checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from lalora.core.search import maximise_log10
from lalora.models.classifier import Batch
from lalora.runtime.distributed import SINGLE, Dist, map_batches


def fit_temperature(
    logits: Tensor, labels: Tensor, log10_min: float = -2.0, log10_max: float = 2.0
) -> tuple[float, str | None]:
    """T minimising the NLL of softmax(logits / T) on (validation) ``logits`` (N, C), and
    ``"low"``/``"high"`` when the optimum is at an edge of [10^log10_min, 10^log10_max]."""
    logits = logits.double()

    def objective(x: float) -> float:
        logp = torch.log_softmax(logits / 10.0**x, dim=1)
        return float(logp.gather(1, labels[:, None]).mean())

    res = maximise_log10(objective, log10_min, log10_max, 81, "temperature", accept_edge=True)
    return 10.0**res.log10, res.at_edge


def _lora_dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if ".lora_dropout." in f".{n}."]


@torch.no_grad()
def mc_dropout_probs(
    model: nn.Module,
    batches: Iterable[Batch],
    logits_fn: Callable[[nn.Module, Batch], Tensor],
    samples: int,
    seed: int = 0,
    dist: Dist | None = None,
) -> Tensor:
    """Predictive probabilities (N, C): the mean softmax over ``samples`` forward passes with
    the LoRA dropout on (everything else in eval mode), seeded per batch by ``seed`` and the
    batch's index (so a split over processes, ``dist``, draws the same masks); the global RNG
    is restored."""
    if samples < 1:
        raise ValueError("MC dropout needs samples >= 1")
    dropouts = _lora_dropouts(model)
    if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in dropouts):
        raise ValueError("MC dropout needs LoRA dropout > 0 (the model card's dropout)")

    def probs(index: int, b: Batch) -> Tensor:
        torch.manual_seed(seed * 1_000_003 + index)
        return (
            sum(torch.softmax(logits_fn(model, b).double(), -1) for _ in range(samples)) / samples
        ).cpu()

    state = torch.get_rng_state()
    was = [m.training for m in dropouts]
    try:
        for m in dropouts:
            m.train()
        return map_batches(probs, list(batches), dist or SINGLE)
    finally:
        for m, w in zip(dropouts, was, strict=True):
            m.train(w)
        torch.set_rng_state(state)


def checkpoint_ensemble(probs: list[Tensor]) -> Tensor:
    """The average (N, C) of the predictive probabilities of several checkpoints (or runs)."""
    if not probs:
        raise ValueError("an ensemble needs at least one member")
    return torch.stack([p.double() for p in probs]).mean(0)
