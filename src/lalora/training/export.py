"""Exporting a checkpoint's adapter, as the ``export`` stage does: the PEFT files of one
training checkpoint (:mod:`lalora.training.finetune`'s layout) copied into a standard PEFT adapter
folder, after checking both are complete and finite, written atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

from lalora.core.io import clean_staging, publish_dir, staging_dir
from lalora.models.adapters import check_adapter
from lalora.training.finetune import checkpoint_dir

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_adapter(checkpoints: Path, step: int, out: Path) -> None:
    """Copy ``adapter_config.json`` and ``adapter_model.safetensors`` (nothing pickled) of the
    checkpoint of ``step`` in the folder ``checkpoints`` into ``out``; a truncated or
    non-finite adapter is refused, naming the file."""
    src = checkpoint_dir(checkpoints, step) / "adapter"
    check_adapter(src, stage="finetune", finite=True)
    clean_staging(out.parent, out.name)
    tmp = staging_dir(out)
    for name in PEFT_FILES:
        shutil.copy2(src / name, tmp / name)
    publish_dir(tmp, out)
