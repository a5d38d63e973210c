"""Stage aggregate: the methods comparison (metrics/comparison.md|csv), the shift table, Tables
2-3, the summary metric (every method), the plot csv files (curves and reliability bins of every
method), Figure 1 and the reliability figure, from the saved results of every stage before it
(:mod:`lalora.study.aggregate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.study.aggregate import read_study, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", type=Path, required=True, help="the study's folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    write_study(params, read_study(params, args.root), args.metrics, args.plots)


if __name__ == "__main__":
    run(main)
