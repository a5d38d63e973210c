"""ARC, OpenBookQA and BoolQ: the paper's preparation, the official files, four answer choices
through the whole Laplace path on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lalora.config import DataConfig, ModelCard
from lalora.config.data import answers_of
from lalora.data.datasets import load_local, load_splits
from lalora.data.files import DataError, read_split
from lalora.data.qa import boolq_prompt, four_choice_prompt
from lalora.laplace.kfac import fit_kfac
from lalora.laplace.marglik import tune_prior
from lalora.laplace.predictive import predict
from lalora.models.adapters import attach_lora, lora_modules
from lalora.models.classifier import answer_token_ids
from lalora.models.pipeline import batches, logits_fn
from lalora.models.zoo import load_card_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


def official(labels: list[str], key: str, n: int = 4) -> dict:
    texts = ["dry palms", "wet palms.", "Palms covered with oil", "palms covered with lotion"]
    texts += ["a fifth one"]
    return {
        "id": "q1",
        "question": {
            "stem": "Which  surface is warmest?",
            "choices": [
                {"text": t, "label": lab} for t, lab in zip(texts[:n], labels, strict=True)
            ],
        },
        "answerKey": key,
    }


def test_four_choice_prompt_is_the_papers():
    qid, prompt, label, cut = four_choice_prompt(official(list("ABCD"), "C"), "f:1")
    assert (qid, label) == ("q1", 2)
    assert prompt[cut[0] : cut[1]] == "Which surface is warmest?" and cut[2] == "end"
    assert prompt == (
        "Select one of the choices that answers the following question: Which surface is warmest? "
        "Choices: A. Dry palms. B. Wet palms. C. Palms covered with oil. D. Palms covered with "
        "lotion. Answer:"
    )
    # numeric labels are read by position; three or five choices are dropped
    assert four_choice_prompt(official(list("1234"), "4"), "f:2")[2] == 3
    assert four_choice_prompt(official(list("ABC"), "A", n=3), "f:3") is None
    assert four_choice_prompt(official(list("ABCDE"), "A", n=5), "f:4") is None
    # the hub's row shape gives the same prompt
    hub = {
        "id": "q1",
        "question": "Which  surface is warmest?",
        "choices": {
            "text": [
                "dry palms",
                "wet palms.",
                "Palms covered with oil",
                "palms covered with lotion",
            ],
            "label": list("ABCD"),
        },
        "answerKey": "C",
    }
    assert four_choice_prompt(hub, "hub:0") == (qid, prompt, label, cut)
    with pytest.raises(ValueError, match=r"f:5: answerKey 'E' is not one of"):
        four_choice_prompt(official(list("ABCD"), "E"), "f:5")


def test_boolq_prompt_and_answers():
    record = {"question": "is it true", "passage": "It is.", "answer": True, "title": "t"}
    _, prompt, label, cut = boolq_prompt(record, "f:1")
    assert (prompt, label) == (
        "Answer the question with only True or False: is it true Context: It is.",
        1,
    )
    assert prompt[cut[0] : cut[1]] == "It is." and cut[2] == "start"  # the passage's end goes
    with pytest.raises(ValueError, match="f:2: field 'answer' must be true or false"):
        boolq_prompt({**record, "answer": "yes"}, "f:2")
    assert answers_of("boolq") == (" False", " True")
    assert answers_of("obqa") == (" A", " B", " C", " D")
    tok, _ = load_card_model(ModelCard(source="tiny", arch="llama"))
    for name in ("boolq", "obqa", "winogrande"):
        assert len(set(answer_token_ids(tok, answers_of(name)))) == len(answers_of(name))


@needs_shared
@pytest.mark.parametrize(
    ("name", "folder", "sizes"),
    [
        ("arc_c", "arc_challenge", {"train": 1117, "dev": 295, "test": 1165}),
        ("arc_e", "arc_easy", {"train": 2241, "dev": 567, "test": 2365}),
        ("obqa", "openbookqa", {"train": 4957, "dev": 500, "test": 500}),
    ],
)
def test_official_files_keep_the_four_choice_questions(name, folder, sizes):
    for split, n in sizes.items():
        examples = load_local(name, SHARED / folder, split)
        assert len(examples) == n
        assert {e.label for e in examples} == {0, 1, 2, 3}
        assert all(e.prompt.count(". Answer:") == 1 for e in examples)


@needs_shared
def test_boolq_local_has_dev_only_and_says_how_to_get_train():
    dev = load_local("boolq", SHARED / "boolq", "dev")
    assert len(dev) == 3270 and sum(e.label for e in dev) == 2033
    cfg = DataConfig(name="boolq", source="local", local_dir=str(SHARED / "boolq"), n_train=10)
    with pytest.raises(DataError, match=r"training split is not among.*data\.source=hub"):
        load_splits(cfg)


@needs_shared
def test_n_train_and_n_test_take_seeded_subsets():
    cfg = DataConfig(
        name="arc_e", source="local", local_dir=str(SHARED / "arc_easy"), n_train=50, n_test=40
    )
    train, test = load_splits(cfg)
    again, _ = load_splits(cfg)
    other, _ = load_splits(DataConfig(**{**cfg.__dict__, "seed": 1}))
    full = load_local("arc_e", SHARED / "arc_easy", "train")
    assert len(train) == 50 and len(test) == 40 and train == again and train != other
    order = {e.id: i for i, e in enumerate(full)}
    assert [order[e.id] for e in train] == sorted(order[e.id] for e in train)  # file order
    with pytest.raises(DataError, match=r"data\.n_train \(train\) is 5000 but the split has 2241"):
        load_splits(DataConfig(**{**cfg.__dict__, "n_train": 5000}))


def test_four_choices_run_the_laplace_path_on_a_tiny_model(tmp_path):
    """C = 4: prepare a local OpenBookQA-format folder, fit (C - 1 = 3 backward passes per
    batch), tune and predict; every probability row sums to one and varies with the input."""
    from lalora.data.splits import prepare

    folder = tmp_path / "obqa"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 14), ("test", 6)):
        rows = []
        for i in range(n):
            key = "ABCD"[int(torch.randint(0, 4, (1,), generator=gen))]
            rec = official(list("ABCD"), key)
            rec["id"] = f"{split}-{i}"
            rec["question"]["stem"] = f"Question number {i} of {split}?"
            rows.append(json.dumps(rec))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(name="obqa", source="local", local_dir=str(folder), n_train=14, n_test=6,
                     val_size=4)  # fmt: skip
    sizes = prepare(cfg, tmp_path / "data")
    assert sizes == {"train": 10, "val": 4, "test": 6}
    split = read_split(tmp_path / "data" / "train.jsonl")
    assert split.answers == (" A", " B", " C", " D")

    card = ModelCard(source="tiny", arch="llama", dropout=0.0)
    tok, base = load_card_model(card)
    model = attach_lora(base, card)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            if ".lora_B." in name:
                m.weight.normal_(0, 0.05, generator=gen)
    model.eval()
    fn = logits_fn(answer_token_ids(tok, split.answers))
    mods = lora_modules(model)
    train = list(batches(tok, list(split.examples), 4, 64))
    post = tune_prior(fit_kfac(model, train, fn, mods, "exact", 4, 64, "nystrom"))
    test = read_split(tmp_path / "data" / "test.jsonl")
    probs, cov = predict(model, list(batches(tok, list(test.examples), 4, 64)), fn, mods, post)
    assert probs.shape == (6, 4) and cov.shape == (6, 3, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(6, dtype=probs.dtype))
    assert bool((torch.linalg.eigvalsh(cov) > 0).all())
