"""Stage members@<model>-<dataset>: the deep ensemble's extra members (``ensemble.members - 1``
fine-tuning runs with seeds ``finetune.seed + 1, ...``) and their final MAP predictions on the
test split (``<predictions>/seed-<s>.safetensors``, listed in ``members.json``). With
``ensemble.members: 1`` nothing is trained and the list is empty."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.provenance import code_fingerprint
from lalora.models.prune import pruned
from lalora.runtime.distributed import finish, init
from lalora.training.members import train_members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prune", type=Path, help="the prune stage's choice (default: none)")
    parser.add_argument("--train", type=Path, required=True, help="prepared train split")
    parser.add_argument("--test", type=Path, required=True, help="prepared test split")
    parser.add_argument("--out", type=Path, required=True, help="members' checkpoint folder")
    parser.add_argument("--predictions", type=Path, required=True, help="a folder")
    args = parser.parse_args()

    params = pruned(load_params(args.params), args.model, args.prune)
    dist = init()
    code = code_fingerprint(Path(__file__))
    train_members(params, args.model, args.train, args.test, args.out, args.predictions, code, dist)
    finish(dist)


if __name__ == "__main__":
    run(main)
