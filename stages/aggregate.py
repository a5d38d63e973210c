"""Stage aggregate: Tables 2-3, the summary metric, plot csv files, Figure 1, reliability."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.cli import run
from lalora.config import load_params
from lalora.io import read_json
from lalora.metrics import check_finite
from lalora.report import dataset_label, write_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", type=Path, required=True, help="metrics/<model>/ folders")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    results = []
    for model in params.models:
        for dataset in params.datasets:
            for step in params.checkpoints:
                path = args.results / model / dataset / f"step-{step}.json"
                result = read_json(path, f"evaluate@{model}-{dataset}-{step}")
                check_finite(result, str(path))
                results.append({**result, "dataset": dataset})
    labels = {d: dataset_label(d, params.dataset(d)) for d in params.datasets}
    write_all(results, list(params.models), labels, args.metrics, args.plots)


if __name__ == "__main__":
    run(main)
