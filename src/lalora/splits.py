"""Preparing the datasets: the digests of their raw data (the ``sources`` stage) and, for one
dataset, as the ``prepare`` stage does: its train and test examples
(:func:`lalora.data.load_splits`), the validation split carved from train (seeded,
:func:`lalora.data.split_validation`), each written as a prepared split file
(:func:`lalora.data.write_split`: the answers on the first line, one example a line)."""

from __future__ import annotations

from pathlib import Path

from lalora.config import DataConfig, Params
from lalora.data import answers_of, load_splits, source_digest, split_validation, write_split
from lalora.io import atomic_write_json

SPLITS = ("train", "val", "test")


def split_path(folder: Path, name: str) -> Path:
    """The prepared split ``name`` (one of :data:`SPLITS`) of the dataset prepared in
    ``folder``."""
    return folder / f"{name}.jsonl"


def prepare(cfg: DataConfig, out: Path) -> dict[str, int]:
    """Write the train, val and test splits of ``cfg`` into the folder ``out``; returns their
    sizes."""
    train, test = load_splits(cfg)
    train, val = split_validation(train, cfg.val_size, cfg.seed)
    for name, examples in zip(SPLITS, (train, val, test), strict=True):
        write_split(split_path(out, name), examples, answers_of(cfg))
    return {"train": len(train), "val": len(val), "test": len(test)}


def write_digests(params: Params, root: Path, out: Path) -> None:
    """The digest of every scored dataset's raw data (:func:`lalora.data.source_digest`: the
    sha256 of each local file it reads, relative to the project ``root``) in
    ``out/<dataset>.json``, the file ``prepare@<dataset>`` depends on."""
    for name in params.scored():
        atomic_write_json(out / f"{name}.json", source_digest(params.dataset(name), root))
