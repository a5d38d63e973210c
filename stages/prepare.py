"""Stage prepare@<dataset>: prompts for train, validation (optional, carved from train) and
test."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.cli import run
from lalora.config import DataConfig, load_params
from lalora.data import answers_of, load_splits, split_validation, write_split


def prepare(cfg: DataConfig, out: Path) -> dict[str, int]:
    """Write ``{out}/{train,val,test}.jsonl``; returns the split sizes."""
    train, test = load_splits(cfg)
    train, val = split_validation(train, cfg.val_size, cfg.seed)
    for name, examples in (("train", train), ("val", val), ("test", test)):
        write_split(out / f"{name}.jsonl", examples, answers_of(cfg))
    return {"train": len(train), "val": len(val), "test": len(test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True, help="a key of data in params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sizes = prepare(load_params(args.params).dataset(args.dataset), args.out)
    print(f"prepared {args.dataset}:", sizes)


if __name__ == "__main__":
    run(main)
