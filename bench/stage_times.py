"""The per-stage time table of a study run with ``LALORA_TIMES`` set (:mod:`lalora.core.timing`):

    LALORA_TIMES=times.jsonl dvc repro
    python -m bench.stage_times times.jsonl --wall 612 --out bench/stage_times.md

One row per stage kind (``fit_kfac`` over every checkpoint, ...): runs, start-up, model load,
compute and total seconds (sums over the runs), then the sum of the stages; ``--wall`` (the
repro's own wall time) adds DVC's share, what the stages' totals leave of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

COLUMNS = {"startup_s": "start-up", "model_load_s": "model load", "compute_s": "compute",
           "total_s": "total"}  # fmt: skip


def table(lines: list[dict], wall: float | None = None) -> str:
    """The markdown table of the recorded stages, in the order they first ran."""
    frame = pd.DataFrame(lines).reindex(columns=["stage", *COLUMNS]).fillna(0.0)
    rows = frame.groupby("stage", sort=False).agg(
        runs=("total_s", "size"), **{k: (k, "sum") for k in COLUMNS}
    )
    rows.loc["all stages"] = [rows.runs.sum(), *(rows[k].sum() for k in COLUMNS)]
    out = ["| stage | runs | " + " | ".join(f"{v} (s)" for v in COLUMNS.values()) + " |",
           "|---|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    for name, row in rows.iterrows():
        cells = " | ".join(f"{row[k]:.1f}" for k in COLUMNS)
        out.append(f"| {name} | {int(row.runs)} | {cells} |")
    if wall is not None:
        rest = wall - rows.loc["all stages", "total_s"]
        out.append(f"| DVC (hashing, lock file, scheduling) | | | | | {rest:.1f} |")
        out.append(f"| `dvc repro` wall time | | | | | {wall:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("times", type=Path, help="the LALORA_TIMES file (JSON lines)")
    parser.add_argument("--wall", type=float, help="the repro's wall time in seconds")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    lines = [json.loads(x) for x in args.times.read_text().splitlines() if x.strip()]
    text = table(lines, args.wall)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
