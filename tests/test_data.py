"""Data: prompts, the generated task, local WinoGrande files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lalora.config import DataConfig
from lalora.data.datasets import (
    WINOGRANDE_PROMPT,
    load_local,
    load_splits,
    split_validation,
    winogrande_prompt,
)
from lalora.data.files import DataError, read_split, write_split
from lalora.data.generated import (
    _ATTRIBUTES,
    _ENTITIES,
    _PROPERTIES,
    COMPARISON_SHARE,
    generate_task,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "winogrande"


def test_prompt_is_the_reports():
    ex = winogrande_prompt(
        {"sentence": "The cup _ fell.", "option1": "red", "option2": "blue", "answer": "2"}, "x"
    )
    assert ex.prompt == (
        "Select one of the choices that answers the following question: The cup _ fell. "
        "Choices: A. red. B. blue. Answer:"
    )
    assert ex.label == 1
    assert WINOGRANDE_PROMPT.endswith("Answer:")


def test_generated_task_is_seeded_balanced_and_disjoint():
    train, test = generate_task(640, 500, seed=0)
    again, _ = generate_task(640, 500, seed=0)
    other, _ = generate_task(640, 500, seed=1)
    assert train == again and train != other and len(train) == 640 and len(test) == 500
    for records in (train, test):
        ones = sum(r["answer"] == "1" for r in records)
        assert 0.4 < ones / len(records) < 0.6
        assert all(r["sentence"].count("_") == 1 for r in records)
        n_comparisons = round(len(records) * COMPARISON_SHARE)
        assert sum(_property(r) is None for r in records) == n_comparisons > 0
    names = lambda rs: {r["option1"] for r in rs} | {r["option2"] for r in rs}  # noqa: E731
    assert names(train) and names(test) and not names(train) & names(test)


def _property(record: dict) -> str | None:
    """The property a property item asks about; None for a comparison item."""
    return next((p for p in _PROPERTIES if record["sentence"].endswith(f" {p}.")), None)


def test_generated_answers_follow_the_word_lists():
    train, test = generate_task(640, 500, seed=0)
    for r in train + test:
        target = r["option1"] if r["answer"] == "1" else r["option2"]
        other = r["option2"] if r["answer"] == "1" else r["option1"]
        prop = _property(r)
        if prop is not None:
            has, lacks = (set(w.split()) for w in _PROPERTIES[prop])
            assert target in has and other in lacks and other not in has
            continue
        comp = r["sentence"].rstrip(".").rsplit(" ", 1)[-1]
        attr = next(a for a, (big, small, _) in _ATTRIBUTES.items() if comp in (big, small))
        values = _ENTITIES[attr]
        larger = values[target] > values[other]
        assert larger == (comp == _ATTRIBUTES[attr][0])


def test_malformed_inputs_name_file_and_line(tmp_path):
    folder = tmp_path / "wg"
    folder.mkdir()
    good = {"qID": "q", "sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}
    (folder / "train_s.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train_s.jsonl:2: invalid JSON"):
        load_local("winogrande", folder, "train_s")
    (folder / "train_s.jsonl").write_text(json.dumps({**good, "sentence": "no blank"}) + "\n")
    with pytest.raises(DataError, match=r"train_s.jsonl:1: sentence must contain exactly one '_'"):
        load_local("winogrande", folder, "train_s")
    (folder / "train_s.jsonl").write_text(json.dumps({"sentence": "A _"}) + "\n")
    with pytest.raises(DataError, match=r"train_s.jsonl:1: missing field 'option1'"):
        load_local("winogrande", folder, "train_s")
    with pytest.raises(DataError, match="local winogrande folder not found: looked in"):
        load_local("winogrande", tmp_path / "absent", "train_s")
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_splits(DataConfig(name="mnist"))


def test_split_round_trip_and_validation(tmp_path):
    train, _ = load_splits(DataConfig(name="generated", n_train=50, n_test=10, val_size=0))
    rest, val = split_validation(train, 10, seed=0)
    assert len(rest) == 40 and len(val) == 10 and not {e.id for e in rest} & {e.id for e in val}
    write_split(tmp_path / "val.jsonl", val, (" A", " B"))
    split = read_split(tmp_path / "val.jsonl")
    assert split.examples == tuple(val) and split.answers == (" A", " B")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_official_winogrande_s_and_dev():
    cfg = DataConfig(
        name="winogrande",
        source="local",
        local_dir=str(SHARED),
        train_split="train_s",
        test_split="dev",
        n_train=640,
        n_test=1267,
    )
    train, test = load_splits(cfg, root=Path("/"))
    assert len(train) == 640 and len(test) == 1267
    assert sum(e.label for e in test) == 639  # answers "2" in dev
