"""Stage export@<model>-<step>: a checkpoint's adapter as a standard PEFT folder
(:mod:`lalora.training.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.core.cli import run
from lalora.training.export import export_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export_adapter(args.checkpoints, args.step, args.out)


if __name__ == "__main__":
    run(main)
