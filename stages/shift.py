"""Stage shift@<model>-<dataset>: the final checkpoint fine-tuned on <dataset> scored on the test
splits that ``shift.<dataset>`` lists, with every method of the comparison
(:mod:`lalora.study.shift`). Writes ``{target: metrics}`` (empty when nothing is listed) and each
target's per-example predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.io import atomic_write_json
from lalora.core.paths import Layout
from lalora.models.prune import pruned
from lalora.runtime.distributed import finish, init
from lalora.study.shift import save_shifted, score_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prune", type=Path, help="the prune stage's choice (default: none)")
    parser.add_argument("--dataset", required=True, help="the dataset fine-tuned on")
    parser.add_argument("--root", type=Path, required=True, help="the study's folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="a folder")
    args = parser.parse_args()

    params = pruned(load_params(args.params), args.model, args.prune)
    dist = init()
    shifted = []
    for one in score_targets(params, Layout(args.model, args.dataset, args.root), dist):
        shifted.append(one)
        scores = ", ".join(f"{m} nll={one.metrics[m]['nll']:.3f}" for m in one.evaluation.probs)
        print(f"{args.model} {args.dataset} -> {one.target}: {scores}")
    if dist.main:
        atomic_write_json(args.out, save_shifted(shifted, args.predictions))
    finish(dist)


if __name__ == "__main__":
    run(main)
