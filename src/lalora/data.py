"""Datasets, prompt templates and the generated default task.

A prepared example is a :class:`Example`: a prompt string and the index of the true answer among
the dataset's answer strings (" A", " B" for WinoGrande). Sources:

- ``generated``: a seeded commonsense task the project builds itself, in WinoGrande's format (a
  sentence with one blank, two options; :mod:`lalora.generated`). Its answers need world
  knowledge (which of two things can fly, is heavier, ...), and train and test use disjoint
  entities, so a model cannot memorise its way to 100%.
- ``local``: a folder of the official WinoGrande jsonl files (``train_s.jsonl``, ``dev.jsonl``).
- ``hub``: ``allenai/winogrande`` through HuggingFace ``datasets``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lalora.config import DataConfig
from lalora.errors import UserError
from lalora.generated import GenerationError, generate_task

WINOGRANDE_PROMPT = (
    "Select one of the choices that answers the following question: {sentence} "
    "Choices: A. {option1}. B. {option2}. Answer:"
)
AB_ANSWERS = (" A", " B")


class DataError(UserError, ValueError):
    """Input data is missing or malformed: the message says where."""


@dataclass(frozen=True)
class Example:
    """One prepared multiple-choice example."""

    id: str
    prompt: str
    label: int


@dataclass(frozen=True)
class Split:
    """Prepared examples plus the answer strings whose next-token logits form the classifier."""

    examples: tuple[Example, ...]
    answers: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# WinoGrande-format records


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
    prompt = WINOGRANDE_PROMPT.format(
        sentence=sentence, option1=record["option1"], option2=record["option2"]
    )
    return Example(id=str(record.get("qID", where)), prompt=prompt, label=int(answer) - 1)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-empty line; bad JSON or bytes that are not
    UTF-8 name file and line."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{i}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                    f"{err.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{i}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            yield i, record


def load_winogrande_local(folder: Path, split: str) -> list[Example]:
    """Read ``{folder}/{split}.jsonl`` (official WinoGrande v1.1 files)."""
    if not folder.is_dir():
        raise DataError(f"local WinoGrande folder not found: looked in {folder.resolve()}")
    path = folder / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"WinoGrande split {split!r} not found: looked for {path.resolve()}")
    examples = [winogrande_prompt(r, f"{path}:{i}") for i, r in read_jsonl(path)]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def load_winogrande_hub(split: str) -> list[Example]:
    """Load a split from the hub: ``train_s`` -> config ``winogrande_s`` split ``train``, ``dev``
    -> the validation split (identical across configs)."""
    import datasets

    size = split.removeprefix("train_") if split.startswith("train_") else "xl"
    hub_split = "train" if split.startswith("train_") else "validation"
    ds = datasets.load_dataset("allenai/winogrande", f"winogrande_{size}", split=hub_split)
    return [winogrande_prompt(r, f"allenai/winogrande[{hub_split}]:{i}") for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------------------------
# Registry and preparation

DATASETS = ("generated", "winogrande")


def load_splits(cfg: DataConfig, root: Path = Path(".")) -> tuple[list[Example], list[Example]]:
    """Load ``(train, test)`` examples for the configured dataset."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; known: {list(DATASETS)}")
    if cfg.name == "generated":
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
    if cfg.source == "local":
        folder = root / cfg.local_dir
        return load_winogrande_local(folder, cfg.train_split), load_winogrande_local(
            folder, cfg.test_split
        )
    if cfg.source == "hub":
        return load_winogrande_hub(cfg.train_split), load_winogrande_hub(cfg.test_split)
    raise DataError(f"dataset {cfg.name!r} cannot be read from source {cfg.source!r}")


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


def write_split(path: Path, examples: Iterable[Example], answers: tuple[str, ...]) -> None:
    """Write examples as jsonl (first line: the answer strings), atomically."""
    from lalora.io import atomic_write_text

    lines = [json.dumps({"answers": list(answers)})]
    lines += [json.dumps(asdict(e)) for e in examples]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_split(path: Path) -> Split:
    """Read a prepared split written by :func:`write_split`."""
    if not path.exists():
        raise DataError(f"prepared split not found: {path}")
    rows = list(read_jsonl(path))
    if not rows or "answers" not in rows[0][1]:
        raise DataError(f"{path}:1: expected a header line with 'answers'")
    answers = tuple(rows[0][1]["answers"])
    examples = []
    for i, r in rows[1:]:
        try:
            ex = Example(id=str(r["id"]), prompt=str(r["prompt"]), label=int(r["label"]))
        except KeyError as err:
            raise DataError(f"{path}:{i}: missing field {err}") from None
        if not 0 <= ex.label < len(answers):
            raise DataError(f"{path}:{i}: label {ex.label} out of range for {len(answers)} answers")
        examples.append(ex)
    return Split(examples=tuple(examples), answers=answers)
