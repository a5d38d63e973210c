"""Accuracy, NLL, expected calibration error and Brier score (method.md section 6), with
bootstrap intervals.

``probs`` is (N, C) predictive probabilities, ``labels`` (N,) integer classes. NLL is the mean of
-log p(y_true); ECE uses equal-width bins on the top-class probability (Guo et al. 2017), bins
(b-1)/B < conf <= b/B; the Brier score is the mean of sum_c (p_c - [c = y])^2 (Brier 1950).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lalora.core.errors import NonFiniteError


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin counts, mean confidence and accuracy (empty bins: count 0, means None, which
    json writes as null: no NaN ever reaches a metrics file)."""

    edges: list[float]
    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]


@dataclass(frozen=True)
class Scores:
    acc: float
    nll: float
    ece: float
    brier: float
    n: int
    bins: ReliabilityBins

    def to_dict(self) -> dict:
        return asdict(self)


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 10) -> ReliabilityBins:
    """Bin examples by top-class confidence into ``n_bins`` equal-width bins of (0, 1]."""
    conf, pred = probs.max(dim=-1)  # (N,), (N,)
    correct = (pred == labels).double()
    idx = torch.clamp(torch.ceil(conf.double() * n_bins).long() - 1, 0, n_bins - 1)  # (N,)
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    denom = count.double().clamp(min=1)
    n = count.tolist()
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1).tolist(),
        count=n,
        confidence=[v if c else None for v, c in zip((conf_sum / denom).tolist(), n, strict=True)],
        accuracy=[v if c else None for v, c in zip((acc_sum / denom).tolist(), n, strict=True)],
    )


def ece_from_bins(bins: ReliabilityBins) -> float:
    """sum_b |B_b| / N * |acc(B_b) - conf(B_b)|."""
    n = sum(bins.count)
    return sum(
        c / n * abs(a - f)
        for c, a, f in zip(bins.count, bins.accuracy, bins.confidence, strict=True)
        if c > 0
    )


def check_finite(obj: object, where: str, path: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``where`` and the key path (e.g. ``laplace.nll``)
    of the first NaN or infinite number in a nest of dicts and lists (None is allowed)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_finite(v, where, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise NonFiniteError(f"{where}: {path or 'value'} is {obj}")


def nll(probs: Tensor, labels: Tensor) -> float:
    """The mean negative log-likelihood of the true labels (N,) under ``probs`` (N, C), in
    float64, a probability floored at 1e-300."""
    p_true = probs.double().gather(1, labels[:, None]).squeeze(1).clamp(min=1e-300)
    return float(-p_true.log().mean())


def score(probs: Tensor, labels: Tensor, n_bins: int = 10) -> Scores:
    """ACC, mean NLL and ECE of predictive probabilities ``probs`` (N, C); non-finite
    probabilities are refused."""
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, C) matching labels (N,), got {tuple(probs.shape)}")
    bad = (~torch.isfinite(probs)).any(dim=1).nonzero().flatten()
    if len(bad):
        raise NonFiniteError(
            f"non-finite predictive probabilities for {len(bad)} example(s), the first at "
            f"index {int(bad[0])}"
        )
    probs = probs.double()
    bins = reliability_bins(probs, labels, n_bins)
    return Scores(
        acc=float((probs.argmax(-1) == labels).double().mean()),
        nll=nll(probs, labels),
        ece=ece_from_bins(bins),
        brier=float(_brier_terms(probs, labels).mean()),
        n=int(labels.shape[0]),
        bins=bins,
    )


def _brier_terms(probs: Tensor, labels: Tensor) -> Tensor:
    """Per example sum_c (p_c - [c = y])^2, (N,)."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(1)


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval: ``low`` and ``high`` around the point estimate."""

    low: float
    high: float


def weighted_metrics(
    probs: Tensor, labels: Tensor, W: Tensor, n_bins: int = 10
) -> dict[str, Tensor]:
    """ACC, NLL, ECE and Brier (each (R,)) of R resamples given as example counts W (R, N)
    (each row sums to N): the metrics of the data set that repeats example i W[r, i] times."""
    probs, n = probs.double(), labels.shape[0]
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    nll = -probs.gather(1, labels[:, None]).squeeze(1).clamp(min=1e-300).log()
    b = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    onehot = torch.nn.functional.one_hot(b, n_bins).double()  # (N, bins)
    gap = W @ (onehot * (correct - conf)[:, None])  # (R, bins): sum of (acc - conf) per bin
    return {
        "acc": W @ correct / n,
        "nll": W @ nll / n,
        "ece": gap.abs().sum(1) / n,
        "brier": W @ _brier_terms(probs, labels) / n,
    }


def bootstrap_intervals(
    probs: Tensor,
    labels: Tensor,
    n_bins: int = 10,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile intervals of ACC, NLL, ECE and Brier over ``resamples`` seeded bootstrap
    resamples of the N examples (Efron 1979). Each resample is a row of multinomial counts W
    (R, N), so every metric is exact through sums: NLL = W nll / N, and ECE from the per-bin
    sums W onehot(bin), W (onehot(bin) conf), W (onehot(bin) correct)."""
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen)
    W = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(resamples, n, dtype=torch.float64)
    )  # (R, N) counts
    values = weighted_metrics(probs, labels, W, n_bins)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {k: Interval(*torch.quantile(v, q).tolist()) for k, v in values.items()}
