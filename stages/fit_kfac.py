"""Stage fit_kfac@<model>-<step>: Kronecker factors of the LoRA weights on the training split."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.io import clean_staging, publish_dir, staging_dir
from lalora.models.prune import pruned
from lalora.runtime.distributed import finish, init
from lalora.study.factors import fit_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prune", type=Path, help="the prune stage's choice (default: none)")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    params = pruned(load_params(args.params), args.model, args.prune)
    dist = init()
    post = fit_checkpoint(params, args.model, args.adapter, args.data, dist)
    if dist.main:
        clean_staging(args.out.parent, args.out.name)
        tmp = staging_dir(args.out)
        post.save(tmp)
        publish_dir(tmp, args.out)
    finish(dist)


if __name__ == "__main__":
    run(main)
