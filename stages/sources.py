"""Stage sources: the digest of every scored dataset's raw data (``{out}/<dataset>.json``: the
sha256 of each local file it reads). It runs at every ``dvc repro`` (``always_changed``) and takes
a moment; ``prepare@<dataset>`` depends on its dataset's digest, so an edited or replaced data
file reruns exactly the stages of that dataset (and ``shift``, which depends on ``data``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.data.splits import write_digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="a folder")
    args = parser.parse_args()
    write_digests(load_params(args.params), Path(args.params).parent, args.out)


if __name__ == "__main__":
    run(main)
