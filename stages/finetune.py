"""Stage finetune@<model>: LoRA fine-tuning with checkpoints at step 0 and every interval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.io import atomic_write_text
from lalora.core.provenance import code_fingerprint
from lalora.models.prune import pruned
from lalora.runtime.distributed import finish, init
from lalora.training.recipe import finetune, usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prune", type=Path, help="the prune stage's choice (default: none)")
    parser.add_argument("--data", type=Path, required=True, help="prepared train split (jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--loss-csv", type=Path, required=True)
    parser.add_argument("--usage", type=Path, help="write the wall time and peak memory (json)")
    args = parser.parse_args()

    params = pruned(load_params(args.params), args.model, args.prune)
    dist = init()
    code = code_fingerprint(Path(__file__))
    run = finetune(params, args.model, args.data, args.out, code, dist=dist)
    if dist.main:
        rows = ["step,loss"] + [f"{s},{loss:.6f}" for s, loss in run.result.losses]
        atomic_write_text(args.loss_csv, "\n".join(rows) + "\n")
        if args.usage:
            atomic_write_text(args.usage, json.dumps(usage(run, dist), indent=1) + "\n")
    finish(dist)


if __name__ == "__main__":
    run(main)
