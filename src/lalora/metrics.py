"""Accuracy, NLL and expected calibration error (method.md section 6).

``probs`` is (N, C) predictive probabilities, ``labels`` (N,) integer classes. NLL is the mean of
-log p(y_true); ECE uses equal-width bins on the top-class probability (Guo et al. 2017), bins
(b-1)/B < conf <= b/B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin counts, mean confidence and accuracy (empty bins have count 0 and NaN means)."""

    edges: list[float]
    count: list[int]
    confidence: list[float]
    accuracy: list[float]


@dataclass(frozen=True)
class Scores:
    acc: float
    nll: float
    ece: float
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
    denom = count.double()
    nan = torch.full_like(denom, float("nan"))
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1).tolist(),
        count=count.tolist(),
        confidence=torch.where(count > 0, conf_sum / denom.clamp(min=1), nan).tolist(),
        accuracy=torch.where(count > 0, acc_sum / denom.clamp(min=1), nan).tolist(),
    )


def ece_from_bins(bins: ReliabilityBins) -> float:
    """sum_b |B_b| / N * |acc(B_b) - conf(B_b)|."""
    n = sum(bins.count)
    return sum(
        c / n * abs(a - f)
        for c, a, f in zip(bins.count, bins.accuracy, bins.confidence, strict=True)
        if c > 0
    )


def score(probs: Tensor, labels: Tensor, n_bins: int = 10) -> Scores:
    """ACC, mean NLL and ECE of predictive probabilities ``probs`` (N, C)."""
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, C) matching labels (N,), got {tuple(probs.shape)}")
    probs = probs.double()
    p_true = probs.gather(1, labels[:, None]).squeeze(1).clamp(min=1e-300)
    bins = reliability_bins(probs, labels, n_bins)
    return Scores(
        acc=float((probs.argmax(-1) == labels).double().mean()),
        nll=float(-p_true.log().mean()),
        ece=ece_from_bins(bins),
        n=int(labels.shape[0]),
        bins=bins,
    )
