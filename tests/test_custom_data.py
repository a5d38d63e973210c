"""The user's own multiple-choice dataset: JSONL, CSV and parquet files with a field mapping,
a prompt template, any number of choices, and every check naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lalora.config import ConfigError, DataConfig, SchemaConfig, compose, load_section
from lalora.config.data import answers_of
from lalora.data.datasets import load_splits, source_digest
from lalora.data.files import DataError

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"qid": "r1", "q": "Which one is red?", "opts": ["a tomato", "the sky", "grass"], "gold": 0},
    {"qid": "r2", "q": "Which one  is wet?", "opts": ["sand", "water", "dust"], "gold": "B"},
    {"qid": "r3", "q": "Which one is cold?", "opts": ["fire", "the sun", "ice"], "gold": "ice"},
]
SCHEMA = SchemaConfig(n_choices=3, id="qid", question="q", choices=("opts",), answer="gold")


def cfg(folder: Path, schema: SchemaConfig = SCHEMA, **kw) -> DataConfig:
    base = dict(name="custom", source="local", local_dir=str(folder), n_train=3, n_test=3,
                val_size=0, schema=schema)  # fmt: skip
    return DataConfig(**{**base, **kw})


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_with_its_own_field_names_gives_the_prompts_and_labels(tmp_path):
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", RECORDS)
    train, _ = load_splits(cfg(tmp_path))
    assert [e.id for e in train] == ["r1", "r2", "r3"]
    assert [e.label for e in train] == [0, 1, 2]  # an index, a letter, a choice's text
    assert train[1].prompt == (
        "Select one of the choices that answers the following question: Which one is wet? "
        "Choices: A. Sand. B. Water. C. Dust. Answer:"
    )
    start, end, keep = train[1].cut
    assert train[1].prompt[start:end] == "Which one is wet?" and keep == "end"
    assert answers_of(cfg(tmp_path)) == (" A", " B", " C")


def test_a_template_and_five_choices(tmp_path):
    five = [{"id": f"x{i}", "question": f"Pick {i}", "choices": list("vwxyz"), "answer": i}
            for i in range(5)]  # fmt: skip
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", five)
    schema = SchemaConfig(n_choices=5, template="Q: {question}\n{choices}\nAnswer:")
    train, _ = load_splits(cfg(tmp_path, schema, n_train=5, n_test=5))
    assert train[4].prompt == "Q: Pick 4\nA. V. B. W. C. X. D. Y. E. Z.\nAnswer:"
    assert answers_of(cfg(tmp_path, schema)) == (" A", " B", " C", " D", " E")


def test_csv_with_a_column_per_choice_or_a_json_list_and_parquet(tmp_path):
    import csv

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jsonl = tmp_path / "jsonl"
    for split in ("train", "test"):
        write_jsonl(jsonl / f"{split}.jsonl", RECORDS)
    reference = load_splits(cfg(jsonl))
    per_column = SchemaConfig(n_choices=3, id="qid", question="q", choices=("c1", "c2", "c3"),
                              answer="gold")  # fmt: skip
    for folder, header, row in (
        ("columns", ["qid", "q", "c1", "c2", "c3", "gold"], lambda r: [*r["opts"]]),
        ("listed", ["qid", "q", "opts", "gold"], lambda r: [json.dumps(r["opts"])]),
    ):
        (tmp_path / folder).mkdir()
        for split in ("train", "test"):
            with (tmp_path / folder / f"{split}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows([r["qid"], r["q"], *row(r), r["gold"]] for r in RECORDS)
    assert load_splits(cfg(tmp_path / "columns", per_column)) == reference
    assert load_splits(cfg(tmp_path / "listed")) == reference
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    table = pa.Table.from_pylist([{**r, "gold": str(r["gold"])} for r in RECORDS])
    for split in ("train", "test"):
        pq.write_table(table, pq_dir / f"{split}.parquet")
    assert load_splits(cfg(pq_dir)) == reference


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"q": "Which?", "opts": ["a", "b"], "gold": 0}, r"train\.jsonl:2: 2 choices, and the "
         r"dataset has 3 \(schema\.n_choices\)"),
        ({"q": "Which?", "opts": ["a", "b", "c"], "gold": 3}, r"train\.jsonl:2: field 'gold' is 3"
         r", not a choice index 0 to 2"),
        ({"q": "Which?", "opts": ["a", "b", "c"], "gold": "D"}, r"train\.jsonl:2: field 'gold' is "
         r"'D': expected a choice index \(0 to 2\), a letter \(A, B, C\)"),
        ({"opts": ["a", "b", "c"], "gold": 0}, r"train\.jsonl:2: missing field 'q'"),
        ({"q": " ", "opts": ["a", "b", "c"], "gold": 0}, r"train\.jsonl:2: field 'q' must be a "
         r"non-empty string"),
        ({"q": "Which?", "opts": "a, b, c", "gold": 0}, r"train\.jsonl:2: field 'opts' must be a "
         r"list of choices"),
    ],
)  # fmt: skip
def test_a_bad_record_is_named_by_file_and_line(tmp_path, bad, message):
    write_jsonl(tmp_path / "train.jsonl", [RECORDS[0], bad])
    write_jsonl(tmp_path / "test.jsonl", RECORDS)
    with pytest.raises(DataError, match=message):
        load_splits(cfg(tmp_path, n_train=2))


def test_not_utf8_two_files_for_a_split_and_a_missing_folder_are_named(tmp_path):
    (tmp_path / "train.csv").write_bytes(b'qid,q,opts,gold\nr1,caf\xe9,"[]",0\n')
    write_jsonl(tmp_path / "test.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"train\.csv: not UTF-8 \(byte 0xe9"):
        load_splits(cfg(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"expected one of train\.jsonl.*found train\.jsonl, "
                       r"train\.csv"):  # fmt: skip
        load_splits(cfg(tmp_path))
    with pytest.raises(DataError, match="custom dataset folder not found"):
        load_splits(cfg(tmp_path / "nowhere"))


def test_the_schema_is_checked_when_the_params_load():
    with pytest.raises(ConfigError, match=r"needs schema\.n_choices >= 2"):
        DataConfig(name="custom", source="local", local_dir="x")
    with pytest.raises(ConfigError, match="only a custom dataset has a schema"):
        DataConfig(name="arc_e", source="local", local_dir="x", schema=SCHEMA)
    with pytest.raises(ConfigError, match=r"must contain \{question\} and \{choices\}"):
        SchemaConfig(n_choices=3, template="Q: {question} {answer}")
    with pytest.raises(ConfigError, match="one field per choice"):
        SchemaConfig(n_choices=3, choices=("a", "b"))
    with pytest.raises(ConfigError, match="needs its id"):
        DataConfig(name="custom", source="hub", schema=SCHEMA)
    with pytest.raises(ConfigError, match=r"n_choices must be 2 to 26"):
        SchemaConfig(n_choices=1)


def test_the_hub_source_reads_by_id_and_fails_offline_with_one_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = DataConfig(name="custom", source="hub", n_train=3, n_test=3, val_size=0,
                     schema=SchemaConfig(n_choices=3, hub_id="someone/their-mcq"))  # fmt: skip
    with pytest.raises(DataError, match=r"dataset 'someone/their-mcq' \(default, split 'train'\) "
                       r"is not in the datasets cache and the hub is off"):  # fmt: skip
        load_splits(hub)
    assert source_digest(hub)["hub"] == ["someone/their-mcq", None]


def test_the_example_option_composes_and_its_files_are_digested():
    raw = compose(ROOT / "conf", ["data=properties3"])
    data = load_section(DataConfig, raw["data"]["properties3"], "data.properties3")
    train, test = load_splits(data, ROOT)
    assert (len(train), len(test)) == (150, 90)
    assert {e.label for e in train} == {0, 1, 2}
    digest = source_digest(data, ROOT)
    assert set(digest["files"]) == {"train.jsonl", "test.jsonl"}
    # a random split of the items: no question with the same choices in both
    folder = ROOT / "conf" / "data" / "examples" / "properties3"
    seen = [{(r["question"], tuple(sorted(r["choices"])))
             for r in map(json.loads, (folder / f"{split}.jsonl").read_text().splitlines())}
            for split in ("train", "test")]  # fmt: skip
    assert len(seen[0]) == 150 and len(seen[1]) == 90 and not seen[0] & seen[1]


def test_a_prompt_or_id_in_two_splits_is_refused_naming_them_or_kept_with_a_warning(tmp_path):
    """prepare counts identical prompts and ids across train, val and test: refused with the
    first ids named, or, with ``leakage: warn``, written with one warning per overlap."""
    from lalora.data.splits import LeakageWarning, prepare

    more = [{"qid": f"t{i}", "q": f"Which one is number {i}?", "opts": ["a", "b", "c"],
             "gold": 0} for i in range(4)]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", RECORDS + more)
    # r2 again under another id (a copied prompt), and a new prompt that reuses the id t3
    test = [{**RECORDS[1], "qid": "copy"}, {**RECORDS[0], "qid": "t3", "q": "Which is blue?"}]
    write_jsonl(tmp_path / "test.jsonl", test)
    data = cfg(tmp_path, n_train=7, n_test=2, val_size=2)
    with pytest.raises(DataError) as err:
        prepare(data, tmp_path / "out", "mine")
    message = str(err.value)
    assert message.startswith("data.mine: the splits overlap")
    assert "test example(s) share an identical prompt with " in message and "(copy)" in message
    assert "share an id with train (t3)" in message or "share an id with val (t3)" in message
    assert "data.mine.leakage: warn" in message
    assert not (tmp_path / "out" / "test.jsonl").exists()
    with pytest.warns(LeakageWarning, match=r"data\.mine: 1 test example\(s\) share an id"):
        sizes = prepare(cfg(tmp_path, n_train=7, n_test=2, val_size=2, leakage="warn"),
                        tmp_path / "out", "mine")  # fmt: skip
    assert sizes == {"train": 5, "val": 2, "test": 2}
    # disjoint splits pass silently
    write_jsonl(tmp_path / "test.jsonl", [{**r, "qid": f"x{i}", "q": f"New question {i}?"}
                                          for i, r in enumerate(RECORDS)])  # fmt: skip
    assert (
        prepare(cfg(tmp_path, n_train=7, n_test=3, val_size=2), tmp_path / "o2", "mine")["test"]
        == 3
    )


def test_an_answer_two_readings_give_different_choices_is_refused_unless_the_format_says(
    tmp_path,
):
    """ "2" among the choices "4", "2", "0" is index 2 and the text of choice 1; "A" among "B",
    "A", "C" is letter A and the text of choice 1: refused, naming file and line, until
    ``schema.answer_format`` says how to read it. An unambiguous value reads as before."""
    digits = {"qid": "d", "q": "Which is two?", "opts": ["4", "2", "0"], "gold": "2"}
    letters = {"qid": "l", "q": "Which is A?", "opts": ["B", "A", "C"], "gold": "A"}
    for record, by_text in ((digits, 1), (letters, 1)):
        write_jsonl(tmp_path / "train.jsonl", [RECORDS[0], record])
        write_jsonl(tmp_path / "test.jsonl", RECORDS)
        with pytest.raises(DataError, match=r"train\.jsonl:2: field 'gold' is '.', which names "
                           r"different choices .*set schema\.answer_format"):  # fmt: skip
            load_splits(cfg(tmp_path, n_train=2))
        for fmt, label in (("text", by_text), ("index" if record is digits else "letter",
                                               2 if record is digits else 0)):  # fmt: skip
            schema = SchemaConfig(**{**SCHEMA.__dict__, "answer_format": fmt})
            for split in ("train", "test"):
                write_jsonl(tmp_path / f"{split}.jsonl", [record])
            train, _ = load_splits(cfg(tmp_path, schema=schema, n_train=1, n_test=1))
            assert train[0].label == label, (record["qid"], fmt)
    schema = SchemaConfig(**{**SCHEMA.__dict__, "answer_format": "letter"})
    write_jsonl(tmp_path / "train.jsonl", [RECORDS[0]])
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'gold' is 0, not a choice's "
                       r"letter \(schema\.answer_format letter"):  # fmt: skip
        load_splits(cfg(tmp_path, schema=schema, n_train=1))


def test_a_csv_row_with_extra_fields_or_an_oversized_field_and_a_braced_template_are_named(
    tmp_path,
):
    import csv

    schema = SchemaConfig(n_choices=3, id="qid", question="q", choices=("a", "b", "c"),
                          answer="gold")  # fmt: skip
    (tmp_path / "train.csv").write_text("qid,q,a,b,c,gold\nr1,Which?,x,y,z,0\n"
                                        "r2,Which one, really?,x,y,z,1\n")  # fmt: skip
    write_jsonl(tmp_path / "test.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"train\.csv:3: 7 fields, and the header has 6: quote a "
                       r"field that holds a comma"):  # fmt: skip
        load_splits(cfg(tmp_path, schema=schema, n_train=1))
    big = "w" * (csv.field_size_limit() + 1)
    (tmp_path / "train.csv").write_text(f"qid,q,a,b,c,gold\nr1,{big},x,y,z,0\n")
    with pytest.raises(DataError, match=r"train\.csv:\d+: not readable as CSV \(field larger"):
        load_splits(cfg(tmp_path, schema=schema, n_train=1))
    with pytest.raises(ConfigError, match=r"braces other than \{question\} and \{choices\}"):
        SchemaConfig(n_choices=3, template="{{question}} {choices} Answer:")
