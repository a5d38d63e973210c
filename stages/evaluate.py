"""Stage evaluate@<model>-<dataset>-<step>: MAP, Laplace and the comparison's other methods on
the dataset's test split (:mod:`lalora.study.evaluation`); writes the metrics and the per-example
predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.io import atomic_write_json, save_predictions
from lalora.models.prune import pruned
from lalora.runtime.distributed import finish, init
from lalora.study.evaluation import evaluate_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prune", type=Path, help="the prune stage's choice (default: none)")
    parser.add_argument("--dataset", required=True, help="a key of data in params.yaml")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--kfac", type=Path, required=True)
    parser.add_argument("--prior", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    args = parser.parse_args()

    params = pruned(load_params(args.params), args.model, args.prune)
    dist = init()
    ev = evaluate_split(params, args.model, args.adapter, args.kfac, args.prior, args.data, dist)
    if not dist.main:
        return finish(dist)
    result = ev.record(args.model, args.dataset, args.step, params.evaluate.ece_bins)
    save_predictions(args.predictions, ev.probs, ev.labels, ev.ids, {"step": args.step, **ev.info})
    atomic_write_json(args.out, result)
    print(
        f"{args.model} {args.dataset} step {args.step}: "
        + ", ".join(
            f"{m} acc={result[m]['acc']:.3f} nll={result[m]['nll']:.3f} ece={result[m]['ece']:.3f}"
            for m in ev.probs
        )
    )
    finish(dist)


if __name__ == "__main__":
    run(main)
