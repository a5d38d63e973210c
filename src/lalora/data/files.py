"""Records in and prepared splits out: an example, a JSONL file read line by line (errors
name file and line), a hub dataset through ``datasets``, the prepared split files (the answers
on the first line, one example a line)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lalora.core.errors import UserError


class DataError(UserError, ValueError):
    """Input data is missing or malformed: the message says where."""


@dataclass(frozen=True)
class Example:
    """One prepared multiple-choice example. ``cut``: ``(start, end, keep)``, the character span
    of the part of ``prompt`` that may be shortened when it exceeds ``finetune.max_length``
    tokens (the question, BoolQ's passage) and which end of it to keep
    (:func:`lalora.models.classifier.encode`); None: the prompt is never cut."""

    id: str
    prompt: str
    label: int
    cut: tuple[int, int, str] | None = None


@dataclass(frozen=True)
class Split:
    """Prepared examples plus the answer strings whose next-token logits form the classifier."""

    examples: tuple[Example, ...]
    answers: tuple[str, ...]


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


def hub_dataset(path: str, config: str | None, hub_split: str):
    """One split of a HuggingFace hub dataset through ``datasets``; offline or unreachable, one
    message that says how to provide it."""
    import datasets

    try:
        return datasets.load_dataset(path, config, split=hub_split)
    except Exception as err:  # offline, unreachable, unknown split: one message either way
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        offline = any(
            os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
            for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        where = "the hub is off (HF_HUB_OFFLINE)" if offline else "the hub did not serve it"
        raise DataError(
            f"dataset {path!r} ({config or 'default'}, split {hub_split!r}) is not in the "
            f"datasets cache and {where} ({type(err).__name__}: {first}). Use "
            f"data.<dataset>.source=local with a folder of the official files, or warm the "
            "cache where the hub is reachable (datasets.load_dataset) and copy $HF_HOME."
        ) from None


def write_split(path: Path, examples: Iterable[Example], answers: tuple[str, ...]) -> None:
    """Write examples as jsonl (first line: the answer strings), atomically."""
    from lalora.core.io import atomic_write_text

    lines = [json.dumps({"answers": list(answers)})]
    lines += [json.dumps(asdict(e)) for e in examples]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _cut(raw, prompt: str) -> tuple[int, int, str] | None:
    if raw is None:
        return None
    start, end, keep = raw
    if not (0 <= int(start) <= int(end) <= len(prompt)) or keep not in ("start", "end"):
        raise ValueError("not a span of the prompt with keep 'start' or 'end'")
    return int(start), int(end), str(keep)


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
            cut = r.get("cut")
            ex = Example(str(r["id"]), str(r["prompt"]), int(r["label"]), _cut(cut, r["prompt"]))
        except KeyError as err:
            raise DataError(f"{path}:{i}: missing field {err}") from None
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}:{i}: malformed field 'cut' {r.get('cut')!r} ({err})") from None
        if not 0 <= ex.label < len(answers):
            raise DataError(f"{path}:{i}: label {ex.label} out of range for {len(answers)} answers")
        examples.append(ex)
    return Split(examples=tuple(examples), answers=answers)
