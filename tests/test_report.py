"""Tables, summary metric and plot data from per-checkpoint results."""

from __future__ import annotations

import json

import pandas as pd

from lalora.report import write_all


def result(model: str, step: int, acc: float) -> dict:
    bins = {
        "edges": [0, 0.5, 1],
        "count": [0, 2],
        "confidence": [float("nan"), 0.8],
        "accuracy": [float("nan"), acc],
    }
    entry = {"acc": acc, "nll": 1 - acc, "ece": abs(0.8 - acc), "n": 2, "bins": bins}
    return {
        "model": model,
        "step": step,
        "map": entry,
        "laplace": {**entry, "nll": 0.5 * (1 - acc)},
        "prior_precision": 2.0 + step,
        "log_marginal_likelihood": -10.0 * (step + 1),
    }


def test_tables_summary_and_curves(tmp_path):
    results = [
        result(m, s, a) for m, a0 in (("a", 0.5), ("b", 0.6)) for s, a in ((0, a0), (10, a0 + 0.2))
    ]
    write_all(results, ["a", "b"], "WG-S", tmp_path / "metrics", tmp_path / "plots")
    t2 = pd.read_csv(tmp_path / "metrics" / "table2.csv")
    assert list(t2.columns) == ["LLM", "Metric", "WG-S"]
    assert t2[(t2.LLM == "b") & (t2.Metric == "ACC")]["WG-S"].item() == 0.8  # final checkpoint
    t3 = pd.read_csv(tmp_path / "metrics" / "table3.csv")
    assert t3[(t3.LLM == "a") & (t3.Metric == "NLL")]["WG-S"].item() == 0.15
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["a"]["step"] == 10 and summary["a"]["prior_precision"] == 12.0
    assert summary["b"]["laplace"]["nll"] == 0.5 * (1 - 0.8)
    curves = pd.read_csv(tmp_path / "plots" / "curves.csv")
    assert set(curves.series) == {"a MAP", "a Laplace", "b MAP", "b Laplace"}
    assert len(curves) == 8 and list(curves.columns) == ["step", "series", "acc", "nll", "ece"]
    assert "| a | ACC | 0.7 |" in (tmp_path / "metrics" / "table2.md").read_text()
    for png in ("figure1.png", "reliability.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
