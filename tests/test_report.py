"""Tables, summary metric and plot data from per-checkpoint results."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lalora.report import write_all


def result(model: str, step: int, acc: float, dataset: str = "wg") -> dict:
    bins = {
        "edges": [0, 0.5, 1],
        "count": [0, 2],
        "confidence": [None, 0.8],
        "accuracy": [None, acc],
    }
    entry = {"acc": acc, "nll": 1 - acc, "ece": abs(0.8 - acc), "n": 2, "bins": bins}
    return {
        "model": model,
        "dataset": dataset,
        "step": step,
        "map": entry,
        "laplace": {**entry, "nll": 0.5 * (1 - acc)},
        "prior_precision": 2.0 + step,
        "log_marginal_likelihood": -10.0 * (step + 1),
    }


def test_tables_summary_and_curves(tmp_path):
    results = [
        result(m, s, a + shift, d)
        for m, a0 in (("a", 0.5), ("b", 0.6))
        for d, shift in (("wg", 0.0), ("arc", -0.1))
        for s, a in ((0, a0), (10, a0 + 0.2))
    ]
    labels = {"wg": "WG-S", "arc": "ARC-E"}
    write_all(results, ["a", "b"], labels, tmp_path / "metrics", tmp_path / "plots")
    t2 = pd.read_csv(tmp_path / "metrics" / "table2.csv")
    assert list(t2.columns) == ["LLM", "Metric", "WG-S", "ARC-E"]
    assert t2[(t2.LLM == "b") & (t2.Metric == "ACC")]["WG-S"].item() == 0.8  # final checkpoint
    assert t2[(t2.LLM == "b") & (t2.Metric == "ACC")]["ARC-E"].item() == 0.7
    t3 = pd.read_csv(tmp_path / "metrics" / "table3.csv")
    assert t3[(t3.LLM == "a") & (t3.Metric == "NLL")]["WG-S"].item() == 0.15
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["a"]["wg"]["step"] == 10 and summary["a"]["wg"]["prior_precision"] == 12.0
    assert summary["b"]["arc"]["laplace"]["nll"] == pytest.approx(0.5 * (1 - 0.7))
    curves = pd.read_csv(tmp_path / "plots" / "curves.csv")
    assert set(curves.series) == {
        f"{m} {d} {k}" for m in "ab" for d in ("wg", "arc") for k in ("MAP", "Laplace")
    }
    assert len(curves) == 16 and list(curves.columns) == ["step", "series", "acc", "nll", "ece"]
    assert "| a | ACC | 0.7 | 0.6 |" in (tmp_path / "metrics" / "table2.md").read_text()
    for png in ("figure1.png", "reliability.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_dataset_labels_are_the_papers():
    from lalora.config import DataConfig
    from lalora.report import dataset_label

    wg = DataConfig(name="winogrande", source="local", local_dir=".", train_split="train_m")
    assert dataset_label("winogrande_m", wg) == "WG-M"
    assert (
        dataset_label("arc_c", DataConfig(name="arc_c", source="local", local_dir=".")) == "ARC-C"
    )
    assert dataset_label("generated", DataConfig()) == "generated"
