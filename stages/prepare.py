"""Stage prepare@<dataset>: prompts for train, validation (optional, carved from train) and
test (:mod:`lalora.data.splits`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.data.splits import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True, help="a key of data in params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sizes = prepare(load_params(args.params).dataset(args.dataset), args.out, args.dataset)
    print(f"prepared {args.dataset}:", sizes)


if __name__ == "__main__":
    run(main)
