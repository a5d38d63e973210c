"""Stage prune@<model>-<dataset>: which block of ``prune.layers`` decoder layers to remove
(Gromov et al. 2024), from the angular distance of the base model's last-token hidden states on
the training prompts; every later stage of the branch builds the model without them."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import load_params
from lalora.core.cli import run
from lalora.core.io import atomic_write_text
from lalora.models.prune import measure, plot, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared train split (jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the choice (json)")
    parser.add_argument("--curve", type=Path, required=True, help="the distance curve (csv)")
    parser.add_argument("--plot", type=Path, required=True, help="the distance curve (png)")
    args = parser.parse_args()

    params = load_params(args.params)
    choice = measure(params, args.model, args.data)
    rows = ["layer,distance,removed"] + [
        f"{k},{d:.8f},{int(k == choice.start)}" for k, d in enumerate(choice.distances)
    ]
    atomic_write_text(args.curve, "\n".join(rows) + "\n")
    plot(choice, args.plot, f"{args.model}: blocks of {choice.layers} layers")
    write(choice, args.out)
    if choice.layers:
        print(f"prune: removing layers {choice.start}..{choice.start + choice.layers - 1} of "
              f"{choice.num_layers} (angular distance {min(choice.distances):.4f})")  # fmt: skip


if __name__ == "__main__":
    run(main)
