"""Tables, summary metric and plot data from per-checkpoint results."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lalora.core.metrics import score
from lalora.study.comparison import Predictions, compare, finals
from lalora.study.report import reliability_table, write_all

METHODS = ("map", "la_val", "temperature")


def study(n: int = 30):
    """Per-checkpoint results and predictions of two models on two datasets at steps 0 and 10,
    as the evaluate stage writes them, from random probabilities; the shift of a's wg run."""
    gen = torch.Generator().manual_seed(0)
    results, preds = [], {}
    for model in ("a", "b"):
        for dataset in ("wg", "arc"):
            labels = torch.randint(0, 2, (n,), generator=gen)
            for step in (0, 10):
                probs = {
                    m: torch.softmax(2 * torch.randn(n, 2, generator=gen, dtype=torch.float64), 1)
                    for m in METHODS
                }
                preds[(model, dataset, step)] = Predictions(probs, labels, list(map(str, range(n))))
                r = {"model": model, "dataset": dataset, "step": step, "methods": list(METHODS)}
                r |= {m: score(p, labels, 5).to_dict() for m, p in probs.items()}
                r |= {"laplace_method": "la_val", "prior_precision": 2.0 + step}
                results.append(r | {"log_marginal_likelihood": -10.0 * (step + 1)})
    shifted = {(m, d): {} for m in "ab" for d in ("wg", "arc")}
    scores = {m: {"acc": 0.5, "nll": 0.7 + i, "ece": 0.1, "brier": 0.5, "n": 3}
              for i, m in enumerate(METHODS)}  # fmt: skip
    shifted[("a", "wg")] = {"arc": {"step": 10, "laplace_method": "la_val", **scores}}
    return results, preds, shifted


def test_tables_summary_and_plots_hold_every_method(tmp_path):
    results, preds, shifted = study()
    labels = {"wg": "WG-S", "arc": "ARC-E"}
    table = compare(preds, ensemble_last=2, n_bins=5, resamples=40)
    bins = reliability_table(finals(preds, ensemble_last=2), n_bins=5)
    write_all(results, ["a", "b"], labels, tmp_path / "metrics", tmp_path / "plots", table, bins,
              shifted)  # fmt: skip
    final = {(r["model"], r["dataset"]): r for r in results if r["step"] == 10}
    t2 = pd.read_csv(tmp_path / "metrics" / "table2.csv")
    assert list(t2.columns) == ["LLM", "Metric", "WG-S", "ARC-E"]
    acc = t2[(t2.LLM == "b") & (t2.Metric == "ACC")]
    assert acc["ARC-E"].item() == round(final[("b", "arc")]["map"]["acc"], 4)  # final checkpoint
    t3 = pd.read_csv(tmp_path / "metrics" / "table3.csv")  # the configured Laplace: la_val
    nll = t3[(t3.LLM == "a") & (t3.Metric == "NLL")]["WG-S"].item()
    assert nll == round(final[("a", "wg")]["la_val"]["nll"], 4)

    # the summary: every method of the comparison, with its values and bounds
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["a"]["wg"]["step"] == 10 and summary["a"]["wg"]["prior_precision"] == 12.0
    for row in table.itertuples():
        entry = summary[row.model][row.dataset][row.key]
        assert entry[row.metric.lower()] == row.value
        if row.metric in ("NLL", "ECE"):
            k = row.metric.lower()
            assert (entry[f"{k}_lo"], entry[f"{k}_hi"]) == (row.low, row.high)
    assert set(summary["b"]["arc"]) == {"step", "prior_precision", "log_marginal_likelihood",
                                        *METHODS, "ensemble"}  # fmt: skip
    assert summary["a"]["wg"]["shift"]["arc"]["temperature"]["nll"] == 2.7
    assert "shift" not in summary["a"]["arc"]

    # curves: a series per model, dataset and per-checkpoint method
    curves = pd.read_csv(tmp_path / "plots" / "curves.csv")
    names = {"map": "MAP", "la_val": "LA (val)", "temperature": "Temperature scaling"}
    assert set(curves.series) == {
        f"{m} {d} {k}" for m in "ab" for d in ("wg", "arc") for k in names.values()
    }
    assert list(curves.columns) == ["step", "series", "acc", "nll", "ece", "brier"]
    assert len(curves) == 2 * 2 * 3 * 2
    row = curves[(curves.series == "b wg LA (val)") & (curves.step == 0)]
    r0 = next(r for r in results if (r["model"], r["dataset"], r["step"]) == ("b", "wg", 0))
    assert row.brier.item() == pytest.approx(r0["la_val"]["brier"], rel=1e-12)

    # reliability: each method's non-empty bins at the final checkpoint, the ensemble's too
    rel = pd.read_csv(tmp_path / "plots" / "reliability.csv")
    assert set(rel.series) == set(curves.series) | {
        f"{m} {d} Checkpoint ensemble" for m in "ab" for d in ("wg", "arc")
    }
    assert (rel.groupby("series")["count"].sum() == 30).all()
    ref = final[("a", "arc")]["temperature"]["bins"]
    got = rel[rel.series == "a arc Temperature scaling"]
    assert got["count"].tolist() == [c for c in ref["count"] if c]
    assert got.accuracy.tolist() == pytest.approx([a for a in ref["accuracy"] if a is not None])
    assert "| a | ACC |" in (tmp_path / "metrics" / "table2.md").read_text()
    for png in ("figure1.png", "reliability.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_dataset_labels_are_the_papers():
    from lalora.config import DataConfig
    from lalora.study.report import dataset_label

    wg = DataConfig(name="winogrande", source="local", local_dir=".", train_split="train_m")
    assert dataset_label("winogrande_m", wg) == "WG-M"
    assert (
        dataset_label("arc_c", DataConfig(name="arc_c", source="local", local_dir=".")) == "ARC-C"
    )
    assert dataset_label("generated", DataConfig()) == "generated"
