"""Stage export@<model>-<step>: a checkpoint's adapter as a standard PEFT folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lalora.adapters import check_adapter
from lalora.cli import run
from lalora.io import clean_staging, publish_dir, staging_dir

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(checkpoint: Path, out: Path) -> None:
    """Copy ``adapter_config.json`` and ``adapter_model.safetensors`` (nothing pickled), after
    checking that both are complete (a truncated checkpoint is refused, naming the file)."""
    src = checkpoint / "adapter"
    check_adapter(src, stage="finetune", finite=True)
    clean_staging(out.parent, out.name)
    tmp = staging_dir(out)
    for name in PEFT_FILES:
        shutil.copy2(src / name, tmp / name)
    publish_dir(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export(args.checkpoints / f"step-{args.step}", args.out)


if __name__ == "__main__":
    run(main)
