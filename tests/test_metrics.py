"""ACC, NLL, ECE against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lalora.metrics import score


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
