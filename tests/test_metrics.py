"""ACC, NLL, ECE against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lalora.core.metrics import score


def test_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    s = score(probs, labels, n_bins=10)
    assert s.acc == pytest.approx(0.5)
    assert s.nll == pytest.approx(
        -(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.45)) / 4
    )
    # bins: 0.9 -> (0.8, 0.9] right, 0.8 -> (0.7, 0.8] wrong, 0.7 -> (0.6, 0.7] right,
    # 0.55 -> (0.5, 0.6] wrong
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
    assert s.ece == pytest.approx(expected)
    assert sum(s.bins.count) == 4 and s.bins.count[8] == 1


def test_perfectly_calibrated_and_bins_param():
    probs = torch.tensor([[1.0, 0.0]] * 3)
    s = score(probs, torch.zeros(3, dtype=torch.long), n_bins=4)
    assert s.acc == 1.0 and s.ece == pytest.approx(0.0) and s.nll == pytest.approx(0.0)
    assert len(s.bins.count) == 4


def test_brier_and_weighted_metrics_equal_explicit_resamples():
    from lalora.core.metrics import bootstrap_intervals, weighted_metrics

    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(40, 4, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, 4, (40,), generator=gen)
    s = score(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    assert s.brier == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()), rel=1e-12)
    idx = torch.randint(0, 40, (3, 40), generator=gen)
    W = torch.stack([torch.bincount(row, minlength=40) for row in idx]).double()
    got = weighted_metrics(probs, labels, W)
    for r in range(3):
        ref = score(probs[idx[r]], labels[idx[r]])
        for k in ("acc", "nll", "ece", "brier"):
            assert float(got[k][r]) == pytest.approx(getattr(ref, k), rel=1e-10, abs=1e-12), k
    ci = bootstrap_intervals(probs, labels, resamples=500)
    for k in ("acc", "nll", "ece", "brier"):
        assert ci[k].low <= getattr(s, k) <= ci[k].high or k == "ece"  # ECE is biased upward
        assert ci[k].low < ci[k].high
