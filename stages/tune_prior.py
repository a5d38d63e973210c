"""Stage tune_prior@<model>-<step>: the comparison's priors (marginal likelihood, validation
NLL, last layer) and the temperature, from one validation pass (:mod:`lalora.study.priors`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.io import atomic_write_json
from lalora.models.prune import pruned
from lalora.runtime.distributed import finish, init
from lalora.study.priors import tune_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prune", type=Path, help="the prune stage's choice (default: none)")
    parser.add_argument("--kfac", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True, help="the step-0 adapter")
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    params = pruned(load_params(args.params), args.model, args.prune)
    dist = init()
    result = tune_checkpoint(params, args.model, args.kfac, args.adapter, args.init, args.val, dist)
    if dist.main:
        atomic_write_json(args.out, result)
    finish(dist)


if __name__ == "__main__":
    run(main)
