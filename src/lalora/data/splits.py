"""Preparing the datasets: the digests of their raw data (the ``sources`` stage) and, for one
dataset, as the ``prepare`` stage does: its train and test examples
(:func:`lalora.data.datasets.load_splits`), the validation split carved from train (seeded,
:func:`lalora.data.datasets.split_validation`), each written as a prepared split file
(:func:`lalora.data.files.write_split`: the answers on the first line, one example a line)."""

from __future__ import annotations

import warnings
from pathlib import Path

from lalora.config import DataConfig, Params
from lalora.config.data import answers_of
from lalora.core.io import atomic_write_json
from lalora.data.datasets import load_splits, source_digest, split_validation
from lalora.data.files import DataError, Example, write_split

SPLITS = ("train", "val", "test")


def split_path(folder: Path, name: str) -> Path:
    """The prepared split ``name`` (one of :data:`SPLITS`) of the dataset prepared in
    ``folder``."""
    return folder / f"{name}.jsonl"


class LeakageWarning(UserWarning):
    """Two splits share a prompt or an id, and ``data.<name>.leakage: warn`` keeps them."""


def check_leakage(splits: dict[str, list[Example]], cfg: DataConfig, key: str) -> list[str]:
    """Every pair of ``splits`` (train, val, test) that shares an identical prompt or an id,
    as messages naming the first few (their ids); refused with a :class:`DataError` unless
    ``cfg.leakage`` is ``warn`` (then a :class:`LeakageWarning` each). Within one split a
    repeated prompt is the data's own business, not leakage."""
    found = []
    names = list(splits)
    for i, a in enumerate(names):
        prompts = {e.prompt: e.id for e in splits[a]}
        ids = {e.id for e in splits[a]}
        for b in names[i + 1 :]:
            same_prompt = [e.id for e in splits[b] if e.prompt in prompts]
            same_id = [e.id for e in splits[b] if e.id in ids]
            for what, hits in (("identical prompt", same_prompt), ("id", same_id)):
                if hits:
                    first = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
                    found.append(f"{len(hits)} {b} example(s) share an {what} with {a} ({first})")
    if found and cfg.leakage == "refuse":
        raise DataError(
            f"data.{key}: the splits overlap: " + "; ".join(found) + ". A model scored on "
            "prompts it was trained or tuned on looks better than it is: remove them from the "
            f"files, or set data.{key}.leakage: warn to keep them (as the benchmark's own "
            "splits may)"
        )
    for message in found:
        warnings.warn(f"data.{key}: {message}", LeakageWarning, stacklevel=2)
    return found


def prepare(cfg: DataConfig, out: Path, key: str | None = None) -> dict[str, int]:
    """Write the train, val and test splits of ``cfg`` (``data.<key>``) into the folder
    ``out``, after :func:`check_leakage`; returns their sizes."""
    train, test = load_splits(cfg)
    train, val = split_validation(train, cfg.val_size, cfg.seed)
    check_leakage({"train": train, "val": val, "test": test}, cfg, key or cfg.name)
    for name, examples in zip(SPLITS, (train, val, test), strict=True):
        write_split(split_path(out, name), examples, answers_of(cfg))
    return {"train": len(train), "val": len(val), "test": len(test)}


def write_digests(params: Params, root: Path, out: Path) -> None:
    """The digest of every scored dataset's raw data (:func:`lalora.data.datasets.source_digest`:
    the sha256 of each local file it reads, relative to the project ``root``) in
    ``out/<dataset>.json``, the file ``prepare@<dataset>`` depends on."""
    for name in params.scored():
        atomic_write_json(out / f"{name}.json", source_digest(params.dataset(name), root))
