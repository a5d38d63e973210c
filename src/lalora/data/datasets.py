"""Datasets, prompt templates and the generated default task.

A prepared example is a :class:`Example`: a prompt string and the index of the true answer among
the dataset's answer strings (" A", " B" for WinoGrande). Sources:

- ``generated``: a seeded commonsense task the project builds itself, in WinoGrande's format (a
  sentence with one blank, two options; :mod:`lalora.data.generated`). Its answers need world
  knowledge (which of two things can fly, is heavier, ...), and train and test use disjoint
  entities, so a model cannot memorise its way to 100%.
- ``local``: a folder of the official files (WinoGrande's ``train_s.jsonl``, ``dev.jsonl``;
  ARC's, OpenBookQA's and BoolQ's jsonl: :data:`DATASETS`).
- ``hub``: the benchmark's HuggingFace dataset through ``datasets``.

``custom`` is the user's own multiple-choice task, from files or the hub
(:mod:`lalora.data.custom`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lalora.config import DataConfig
from lalora.config.data import AB_ANSWERS, ABCD_ANSWERS, BOOL_ANSWERS
from lalora.core.paths import resolve_dir
from lalora.data.files import (
    DataError,
    Example,
    hub_dataset,
    read_jsonl,
)
from lalora.data.generated import GenerationError, generate_task
from lalora.data.qa import QAFormatError, boolq_prompt, fill, four_choice_prompt

WINOGRANDE_PROMPT = (
    "Select one of the choices that answers the following question: {sentence} "
    "Choices: A. {option1}. B. {option2}. Answer:"
)


def winogrande_prompt(record: dict, where: str) -> Example:
    """Turn one WinoGrande record into an :class:`Example`, checking its fields."""
    for key in ("sentence", "option1", "option2", "answer"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
    for key in ("sentence", "option1", "option2"):
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    sentence = record["sentence"]
    if sentence.count("_") != 1:
        raise DataError(f"{where}: sentence must contain exactly one '_': {sentence!r}")
    answer = str(record["answer"])
    if answer not in ("1", "2"):
        raise DataError(f"{where}: answer must be '1' or '2', got {answer!r}")
    prompt, cut = fill(
        WINOGRANDE_PROMPT, "sentence", "end",
        sentence=sentence, option1=record["option1"], option2=record["option2"],
    )  # fmt: skip
    return Example(str(record.get("qID", where)), prompt, int(answer) - 1, cut)


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its answer strings, its local files by split name (``{split}`` is replaced
    by the split name), where ``datasets`` finds it on the hub, and the record parser
    (``record, where -> (id, prompt, label, cut)``, or None for a record the preparation
    drops)."""

    answers: tuple[str, ...]
    local_file: dict[str, str] | str
    hub: tuple[str, str | None]
    hub_split: dict[str, str]
    parse: Callable[[dict, str], tuple[str, str, int, tuple] | None]


def _winogrande(record: dict, where: str) -> tuple[str, str, int, tuple | None]:
    e = winogrande_prompt(record, where)
    return e.id, e.prompt, e.label, e.cut


def _arc_files(kind: str) -> dict[str, str]:
    return {s: f"ARC-{kind}-{s.capitalize()}.jsonl" for s in ("train", "dev", "test")}


_ARC_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


DATASETS: dict[str, DatasetSpec | None] = {
    "generated": None,  # built by lalora.data.generated, not read
    "custom": None,  # the user's own files or hub dataset, read by lalora.data.custom
    "winogrande": DatasetSpec(
        AB_ANSWERS, "{split}.jsonl", ("allenai/winogrande", None), {}, _winogrande
    ),
    "arc_c": DatasetSpec(
        ABCD_ANSWERS,
        _arc_files("Challenge"),
        ("allenai/ai2_arc", "ARC-Challenge"),
        _ARC_SPLITS,
        four_choice_prompt,
    ),
    "arc_e": DatasetSpec(
        ABCD_ANSWERS,
        _arc_files("Easy"),
        ("allenai/ai2_arc", "ARC-Easy"),
        _ARC_SPLITS,
        four_choice_prompt,
    ),
    "obqa": DatasetSpec(
        ABCD_ANSWERS,
        {s: f"{s}.jsonl" for s in ("train", "dev", "test")},
        ("allenai/openbookqa", "main"),
        _ARC_SPLITS,
        four_choice_prompt,
    ),
    "boolq": DatasetSpec(
        BOOL_ANSWERS,
        {"dev": "dev.jsonl"},
        ("google/boolq", None),
        {"train": "train", "dev": "validation"},
        boolq_prompt,
    ),
}


def _spec(name: str) -> DatasetSpec | None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    return DATASETS[name]


def _parse_all(spec: DatasetSpec, rows: Iterable[tuple[int, dict]], where: str) -> list[Example]:
    out = []
    for i, record in rows:
        try:
            parsed = spec.parse(record, f"{where}:{i}")
        except QAFormatError as err:
            raise DataError(str(err)) from None
        if parsed is not None:
            out.append(Example(*parsed))
    return out


def local_path(name: str, folder: Path, split: str) -> Path:
    """The official file of one split of dataset ``name`` in ``folder`` (checked to exist)."""
    if name == "custom":
        from lalora.data import custom

        return custom.split_file(folder, split)
    spec = _spec(name)
    if spec is None:
        raise DataError(f"dataset {name!r} is generated, not read from files")
    if not folder.is_dir():
        raise DataError(f"local {name} folder not found: looked in {folder.resolve()}")
    files = spec.local_file
    if isinstance(files, str):
        path = folder / files.format(split=split)
    elif split in files:
        path = folder / files[split]
    else:
        hint = ""
        if name == "boolq" and split == "train":
            hint = (
                " BoolQ's training split is not among the local files (only dev.jsonl is "
                "shipped): use data.source=hub (google/boolq), a folder that has it, or "
                "split_from: dev (a seeded split of dev, not the official protocol)."
            )
        raise DataError(
            f"dataset {name!r} has no local split {split!r}; local splits: {sorted(files)}.{hint}"
        )
    if not path.exists():
        raise DataError(f"{name} split {split!r} not found: looked for {path.resolve()}")
    return path


def load_local(name: str, folder: Path, split: str) -> list[Example]:
    """Examples of one split of dataset ``name`` from a folder of its official files."""
    path = local_path(name, folder, split)
    examples = _parse_all(_spec(name), read_jsonl(path), str(path))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or every record was dropped)")
    return examples


def load_hub(name: str, split: str) -> list[Example]:
    """Examples of one split from the HuggingFace hub through ``datasets``."""
    spec = _spec(name)
    if spec is None:
        raise DataError(f"dataset {name!r} is generated, not read from the hub")
    path, config = spec.hub
    hub_split = spec.hub_split.get(split, split)
    if name == "winogrande":  # train_s -> config winogrande_s, split train; dev -> validation
        train = split.startswith("train_")
        config = f"winogrande_{split.removeprefix('train_') if train else 'xl'}"
        hub_split = "train" if train else "validation"
    ds = hub_dataset(path, config, hub_split)
    return _parse_all(spec, enumerate(ds), f"{path}[{hub_split}]")


def read_splits(cfg: DataConfig) -> list[str]:
    """The splits a data config reads: ``[split_from]``, or ``[train_split, test_split]``."""
    return [cfg.split_from] if cfg.split_from else [cfg.train_split, cfg.test_split]


def source_files(cfg: DataConfig, root: Path = Path(".")) -> list[Path]:
    """The local files a data config reads (none for the generated task and the hub)."""
    if cfg.source != "local":
        return []
    folder = resolve_dir(cfg.local_dir, root)
    return [local_path(cfg.name, folder, s) for s in dict.fromkeys(read_splits(cfg))]


def source_digest(cfg: DataConfig, root: Path = Path(".")) -> dict:
    """What the prepared splits of ``cfg`` are made from: the sha256 and size of each local file
    it reads (a changed file changes the digest), or the hub dataset and splits."""
    out: dict = {"name": cfg.name, "source": cfg.source, "splits": read_splits(cfg)}
    if cfg.source == "local":
        out["files"] = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in source_files(cfg, root)
        }
    elif cfg.source == "hub" and cfg.name == "custom":
        out["hub"] = [cfg.schema.hub_id, cfg.schema.hub_config or None]
    elif cfg.source == "hub":
        spec = _spec(cfg.name)
        out["hub"] = list(spec.hub) if spec is not None else None
    return out


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_split(cfg: DataConfig, split: str, root: Path) -> list[Example]:
    if cfg.name == "custom":
        from lalora.data import custom

        folder = resolve_dir(cfg.local_dir, root) if cfg.source == "local" else None
        try:
            return [Example(*parsed) for parsed in custom.load(cfg, folder, split)]
        except custom.CustomDataError as err:
            raise DataError(str(err)) from None
    if cfg.source == "local":
        return load_local(cfg.name, resolve_dir(cfg.local_dir, root), split)
    if cfg.source == "hub":
        return load_hub(cfg.name, split)
    raise DataError(f"dataset {cfg.name!r} cannot be read from source {cfg.source!r}")


def load_splits(cfg: DataConfig, root: Path = Path(".")) -> tuple[list[Example], list[Example]]:
    """Load ``(train, test)`` examples for the configured dataset (``root``: the project, or an
    experiment's workspace, that relative folders start from)."""
    spec = _spec(cfg.name)
    if spec is None and cfg.name == "generated":
        if cfg.source != "generated":
            raise DataError("dataset 'generated' needs source: generated")
        try:
            train, test = generate_task(cfg.n_train, cfg.n_test, cfg.seed)
        except GenerationError as e:
            raise DataError(str(e)) from e
        return (
            [winogrande_prompt(r, f"generated train {i}") for i, r in enumerate(train)],
            [winogrande_prompt(r, f"generated test {i}") for i, r in enumerate(test)],
        )
    if cfg.split_from:
        return partition(_load_split(cfg, cfg.split_from, root), cfg)
    train, test = (_load_split(cfg, s, root) for s in (cfg.train_split, cfg.test_split))
    return (
        subsample(train, cfg.n_train, cfg.seed, f"data.n_train ({cfg.train_split})"),
        subsample(test, cfg.n_test, cfg.seed + 1, f"data.n_test ({cfg.test_split})"),
    )


def partition(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """``split_from``: a seeded, disjoint (train, test) of ``n_train`` and ``n_test`` examples of
    one split, each in file order."""
    need = cfg.n_train + cfg.n_test
    if need > len(examples):
        raise DataError(
            f"data.n_train + data.n_test is {need} but split_from {cfg.split_from!r} has "
            f"{len(examples)} examples"
        )
    order = list(range(len(examples)))
    random.Random(cfg.seed + 2).shuffle(order)
    test_idx, train_idx = set(order[: cfg.n_test]), set(order[cfg.n_test : need])
    return (
        [e for i, e in enumerate(examples) if i in train_idx],
        [e for i, e in enumerate(examples) if i in test_idx],
    )


def subsample(examples: list[Example], n: int, seed: int, key: str) -> list[Example]:
    """A seeded subset of ``n`` examples in their file order (all of them when ``n`` is the
    split's size); more than the split holds is an error naming ``key``."""
    if n > len(examples):
        raise DataError(f"{key} is {n} but the split has {len(examples)} examples")
    if n == len(examples):
        return examples
    keep = set(random.Random(seed).sample(range(len(examples)), n))
    return [e for i, e in enumerate(examples) if i in keep]


def split_validation(
    train: list[Example], val_size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Carve a seeded validation split of ``val_size`` examples out of ``train``."""
    if not train:
        raise DataError("no training examples to carve a validation split from")
    if val_size < 0 or val_size >= len(train):
        raise DataError(
            f"data.val_size must be in [0, {len(train)}) for {len(train)} training examples, "
            f"got {val_size}"
        )
    order = list(range(len(train)))
    random.Random(seed + 1).shuffle(order)
    val_idx = set(order[:val_size])
    return (
        [e for i, e in enumerate(train) if i not in val_idx],
        [e for i, e in enumerate(train) if i in val_idx],
    )
