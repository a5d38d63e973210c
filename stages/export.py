"""Stage export@<model>-<step>: a checkpoint's adapter as a standard PEFT folder."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lalora.io import publish_dir, staging_dir

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(checkpoint: Path, out: Path) -> None:
    """Copy ``adapter_config.json`` and ``adapter_model.safetensors`` (nothing pickled)."""
    src = checkpoint / "adapter"
    missing = [f for f in PEFT_FILES if not (src / f).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint} lacks {missing}")
    json.loads((src / "adapter_config.json").read_text())  # must be valid json
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
    main()
