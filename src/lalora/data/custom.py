"""The user's own multiple-choice dataset (``data.<name>.name: custom``), read as its
``schema`` (:class:`lalora.config.SchemaConfig`) says.

Files: ``{local_dir}/{split}.jsonl``, ``.csv`` or ``.parquet`` (exactly one per split). A JSONL
line or a parquet row is one record; in a CSV the choices are one column per choice, or one
column holding a JSON list (``["red", "green", "blue"]``). The hub: ``schema.hub_id`` through
``datasets``, with the same field names. Every record is checked where it is read: a missing
or empty field, a record with another number of choices than ``schema.n_choices``, or an answer
that names no choice stops with the file and line (or row) and the field.

Prompt: ``schema.template`` (default: the ARC prompt of :data:`lalora.data.qa.MC_PROMPT`) with
``{question}`` and ``{choices}`` rendered "A. red. B. green. C. blue." as for ARC; the answers
are " A", " B", ... . The question is the part that may be shortened for
``finetune.max_length`` (its start goes first); the template's other text and the choices never
are.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from lalora.config import DataConfig, SchemaConfig
from lalora.config.data import LETTERS
from lalora.core.errors import UserError
from lalora.data.qa import MC_PROMPT, choice_text, fill

SUFFIXES = (".jsonl", ".csv", ".parquet")


class CustomDataError(UserError, ValueError):
    """A custom dataset's file or record is malformed: the message says where."""


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise CustomDataError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise CustomDataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return " ".join(value.split())


def _choices(record: dict, schema: SchemaConfig, where: str) -> list[str]:
    if len(schema.choices) > 1:
        return [_text(record, key, where) for key in schema.choices]
    key = schema.choices[0]
    if key not in record:
        raise CustomDataError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    value = record[key]
    if isinstance(value, str):  # a CSV cell: a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise CustomDataError(
                f"{where}: field {key!r} must be a list of choices (in a CSV, a JSON list such "
                f'as ["red", "blue"]), got {value!r}'
            ) from None
    if not isinstance(value, list):
        raise CustomDataError(f"{where}: field {key!r} must be a list of choices, got {value!r}")
    return [_text({key: v}, key, where) for v in value]


def _readings(value: object, choices: list[str]) -> dict[str, int]:
    """Each way ``value`` names a choice: a 0-based index (a number, or digits), a letter A,
    B, ..., the text of exactly one choice."""
    out = {}
    if isinstance(value, bool):
        return out
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value.strip() if isinstance(value, str) else value)
        if 0 <= index < len(choices):
            out["index"] = index
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text in LETTERS[: len(choices)]:
            out["letter"] = LETTERS.index(text)
        matches = [i for i, c in enumerate(choices) if c == " ".join(text.split())]
        if len(matches) == 1:
            out["text"] = matches[0]
    return out


def _answer(value: object, choices: list[str], key: str, where: str, fmt: str = "auto") -> int:
    """The true choice's index, reading ``value`` as ``fmt`` says (``auto``: any reading, and
    refused where two readings name different choices)."""
    readings = _readings(value, choices)
    if fmt != "auto":
        if fmt in readings:
            return readings[fmt]
        raise CustomDataError(
            f"{where}: field {key!r} is {value!r}, not a choice's {fmt} "
            f"(schema.answer_format {fmt}; choices {choices})"
        )
    if len(set(readings.values())) > 1:
        meant = ", ".join(f"as {k}: {LETTERS[i]} ({choices[i]!r})" for k, i in readings.items())
        raise CustomDataError(
            f"{where}: field {key!r} is {value!r}, which names different choices ({meant}); "
            "set schema.answer_format to index, letter or text"
        )
    if readings:
        return next(iter(readings.values()))
    if isinstance(value, int) and not isinstance(value, bool):
        raise CustomDataError(
            f"{where}: field {key!r} is {value}, not a choice index 0 to {len(choices) - 1}"
        )
    raise CustomDataError(
        f"{where}: field {key!r} is {value!r}: expected a choice index (0 to "
        f"{len(choices) - 1}), a letter ({', '.join(LETTERS[: len(choices)])}) or the text of "
        "exactly one choice"
    )


def parse(record: dict, schema: SchemaConfig, where: str) -> tuple[str, str, int, tuple]:
    """(id, prompt, label, cut) of one record (``where``: its file and line, for errors)."""
    question = _text(record, schema.question, where)
    choices = _choices(record, schema, where)
    if len(choices) != schema.n_choices:
        raise CustomDataError(
            f"{where}: {len(choices)} choices, and the dataset has {schema.n_choices} "
            "(schema.n_choices): every question needs the same number"
        )
    if schema.answer not in record:
        raise CustomDataError(f"{where}: missing field {schema.answer!r}")
    label = _answer(record[schema.answer], choices, schema.answer, where, schema.answer_format)
    rendered = " ".join(f"{LETTERS[i]}. {choice_text(c)}." for i, c in enumerate(choices))
    prompt, cut = fill(schema.template or MC_PROMPT, "question", "end",
                       question=question, choices=rendered)  # fmt: skip
    rid = record.get(schema.id)
    return (str(rid) if rid not in (None, "") else where), prompt, label, cut


def split_file(folder: Path, split: str) -> Path:
    """The one file of ``split`` in ``folder``: ``{split}.jsonl``, ``.csv`` or ``.parquet``."""
    if not folder.is_dir():
        raise CustomDataError(f"custom dataset folder not found: looked in {folder.resolve()}")
    found = [folder / f"{split}{s}" for s in SUFFIXES if (folder / f"{split}{s}").exists()]
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise CustomDataError(
            f"custom split {split!r}: expected one of {split}.jsonl, {split}.csv or "
            f"{split}.parquet in {folder.resolve()}, found {what}"
        )
    return found[0]


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:  # more fields than the header names
                    raise CustomDataError(
                        f"{where}: {len(reader.fieldnames) + len(row[None])} fields, and the "
                        f"header has {len(reader.fieldnames)}: quote a field that holds a comma"
                    )
                if any(v not in (None, "") for v in row.values()):
                    yield where, row
    except csv.Error as err:  # a field over csv.field_size_limit(), a stray quote
        raise CustomDataError(f"{path}:{reader.line_num}: not readable as CSV ({err})") from None
    except UnicodeDecodeError as err:
        raise CustomDataError(
            f"{path}: not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "re-encode the file as UTF-8"
        ) from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # ArrowInvalid, OSError: not a parquet file
        raise CustomDataError(f"{path}: not a readable parquet file ({err})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of every record of a JSONL, CSV or parquet file."""
    from lalora.data.files import read_jsonl

    if path.suffix == ".jsonl":
        yield from ((f"{path}:{i}", r) for i, r in read_jsonl(path))
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    else:
        yield from _parquet_rows(path)


def _hub_rows(cfg: DataConfig, split: str) -> Iterator[tuple[str, dict]]:
    from lalora.data.files import hub_dataset

    schema = cfg.schema
    ds = hub_dataset(schema.hub_id, schema.hub_config or None, split)
    for i, row in enumerate(ds):
        yield f"{schema.hub_id}[{split}] row {i}", dict(row)


def load(cfg: DataConfig, folder: Path | None, split: str) -> list[tuple[str, str, int, tuple]]:
    """Every record of one split, parsed: from ``folder`` (``source: local``) or the hub."""
    source = _hub_rows(cfg, split) if cfg.source == "hub" else rows(split_file(folder, split))
    out = [parse(record, cfg.schema, where) for where, record in source]
    if not out:
        raise CustomDataError(f"custom split {split!r} of {cfg.schema.hub_id or folder}: empty")
    return out
