"""Stage aggregate: the methods comparison (metrics/comparison.md|csv), the shift table, Tables
2-3, the summary metric (every method), the plot csv files (curves and reliability bins of every
method), Figure 1 and the reliability figure, from the saved predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.cli import run
from lalora.comparison import (
    Predictions,
    compare,
    comparison_markdown,
    finals,
    shift_markdown,
    shift_table,
)
from lalora.config import load_params
from lalora.io import atomic_write_text, load_predictions, read_json
from lalora.metrics import check_finite
from lalora.report import dataset_label, reliability_table, write_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", type=Path, required=True, help="metrics/<model>/ folders")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="predictions/ folder")
    parser.add_argument("--shift", type=Path, required=True, help="metrics/shift/ folder")
    args = parser.parse_args()
    params = load_params(args.params)
    results, preds = [], {}
    for model in params.models:
        for dataset in params.datasets:
            for step in params.checkpoints:
                stage = f"evaluate@{model}-{dataset}-{step}"
                path = args.results / model / dataset / f"step-{step}.json"
                result = read_json(path, stage)
                check_finite(result, str(path))
                results.append({**result, "dataset": dataset})
                probs, labels, ids = load_predictions(
                    args.predictions / model / dataset / f"step-{step}.safetensors", stage
                )
                preds[(model, dataset, step)] = Predictions(probs, labels, ids)
    labels: dict[str, str] = {}  # the paper's column names; a repeated one falls back to the key
    for d in params.scored():
        label = dataset_label(d, params.dataset(d))
        labels[d] = d if label in labels.values() else label
    trained = {d: labels[d] for d in params.datasets}
    members = {}
    for model in params.models:
        for dataset in params.datasets:
            stage = f"members@{model}-{dataset}"
            folder = args.predictions / "members" / model / dataset
            seeds = read_json(folder / "members.json", stage)["seeds"]
            members[(model, dataset)] = [
                Predictions(*load_predictions(folder / f"seed-{s}.safetensors", stage))
                for s in seeds
            ]
    cfg = params.evaluate
    table = compare(preds, cfg.ensemble_last, cfg.ece_bins, cfg.bootstrap, members=members)
    atomic_write_text(args.metrics / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(args.metrics / "comparison.md", comparison_markdown(table, labels))
    bins = reliability_table(finals(preds, cfg.ensemble_last, members), cfg.ece_bins)
    shifted = {}
    for model in params.models:
        for dataset in params.datasets:
            path = args.shift / model / f"{dataset}.json"
            shifted[(model, dataset)] = read_json(path, f"shift@{model}-{dataset}")
            check_finite(shifted[(model, dataset)], str(path))
    st = shift_table(shifted, labels)
    atomic_write_text(args.metrics / "shift.csv", st.to_csv(index=False))
    atomic_write_text(args.metrics / "shift.md", shift_markdown(st))
    write_all(
        results, list(params.models), trained, args.metrics, args.plots,
        comparison=table, bins=bins, shifted=shifted,
    )  # fmt: skip


if __name__ == "__main__":
    run(main)
