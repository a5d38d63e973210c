"""Predictions for new inputs from a study's artifacts (``lalora.study.predict``), and the README's
Laplace-LoRA snippet on a plain PEFT model, both against what the pipeline's evaluate wrote."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny_study import (
    AT,
    ROOT,
    evaluate,
    fit_kfac,
    prune,
    train_and_export,
    tune_prior,
    write_params,
)

from lalora.core.cli import run
from lalora.core.errors import ArtifactError
from lalora.core.io import load_predictions
from lalora.core.paths import Layout


def _edit(params: dict) -> None:
    # the snippet's defaults: a prior centred at zero, batches of 8, 10,000 samples
    params["prior"]["mean"] = "zero"
    params["kfac"]["batch_size"] = 8
    params["evaluate"]["batch_size"] = 8
    params["predictive"]["samples"] = 10000


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        write_params(folder, _edit)
        train_and_export(mp)
        fit_kfac(mp)
        tune_prior(mp)
        evaluate(mp)
    return folder


def test_predict_on_the_test_split_reproduces_evaluate(study):
    from lalora.study.predict import load

    predictor = load("tiny-a", "generated", root=study, allow_stale=True)
    examples = predictor.read(study / "data" / "generated" / "test.jsonl")
    saved, _, ids = load_predictions(study / AT.predictions(2))
    assert [e.id for e in examples] == ids
    assert predictor.step == 2 and predictor.laplace.tuned.configured == "la_val"
    for method in ("la", "la_val", "llla"):
        pred = predictor.predict(examples, method)
        assert float((pred.probs - saved[method]).abs().max()) <= 1e-10, method
        assert float((pred.map - saved["map"]).abs().max()) <= 1e-6
        assert pred.std.shape == (len(examples), 1) and bool((pred.std > 0).all())


def test_the_command_renders_a_question_and_reads_records(study, monkeypatch, capsys):
    from lalora.study.predict import main

    monkeypatch.chdir(study)
    out = study / "one.jsonl"
    main(["--model", "tiny-a", "--dataset", "generated", "--method", "la",
          "--question", "Of the owl and the sofa, only the _ is alive.",
          "--choices", "owl", "sofa", "--out", str(out), "--allow-stale"])  # fmt: skip
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["method"] == "la" and set(row["choices"]) == {"A", "B"}
    assert sum(c["laplace"] for c in row["choices"].values()) == pytest.approx(1, abs=1e-12)
    assert set(row["contrast_std"]) == {"A-B"} and row["contrast_std"]["A-B"] > 0
    assert "Choices: A. owl. B. sofa. Answer:" in row["prompt"]
    records = study / "records.jsonl"
    records.write_text(json.dumps({"qID": "q1", "sentence": "Of the owl and the sofa, only the "
                                   "_ is alive.", "option1": "owl", "option2": "sofa",
                                   "answer": "1"}) + "\n")  # fmt: skip
    main(["--model", "tiny-a", "--dataset", "generated", "--method", "la",
          "--input", str(records), "--allow-stale"])  # fmt: skip
    shown = capsys.readouterr().out
    assert shown.startswith("q1: ") and "logit contrast std (la): A-B" in shown
    a = re.search(r"\n  A\s+([\d.]+)\s+([\d.]+)", shown)
    assert float(a[2]) == pytest.approx(row["choices"]["A"]["laplace"], abs=1e-4)


def test_a_missing_artifact_names_the_stage_that_makes_it(study):
    from lalora.study.predict import PredictError, load

    with pytest.raises(ArtifactError, match=r"fit_kfac@tiny-a-generated-0"):
        load("tiny-a", "generated", step=0, root=study, allow_stale=True)
    with pytest.raises(PredictError, match="step 3 is not a checkpoint"):
        load("tiny-a", "generated", step=3, root=study, allow_stale=True)


def test_every_input_is_checked_before_a_weight_is_loaded(study, monkeypatch, capsys):
    """A question the dataset's format refuses, a missing or empty --input, an unknown model:
    one paragraph and exit status 2, and the model is never loaded; artifacts no DVC lock file
    vouches for are refused unless --allow-stale."""
    import lalora.models.pipeline
    from lalora.predict import main as command

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(lalora.models.pipeline, "load_adapted", never)
    monkeypatch.chdir(study)
    (study / "empty.jsonl").write_text("")
    base = ["--model", "tiny-a", "--dataset", "generated", "--allow-stale"]
    cases = {
        "sentence must contain exactly one '_'": ["--question", "No blank.", "--choices", "a", "b"],
        "3 choices given": ["--question", "The _ flies.", "--choices", "a", "b", "c"],
        "no such file": ["--input", "missing.jsonl"],
        "no records (the file is empty)": ["--input", "empty.jsonl"],
    }
    for message, args in cases.items():
        monkeypatch.setattr(sys, "argv", ["predict", *base, *args])
        with pytest.raises(SystemExit) as exit_:
            run(command)
        assert exit_.value.code == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "predict",
            "--model",
            "nosuch",
            "--dataset",
            "generated",
            "--question",
            "The _ flies.",
            "--choices",
            "a",
            "b",
        ],
    )
    with pytest.raises(SystemExit):
        run(command)
    err = capsys.readouterr().err
    assert "unknown model 'nosuch'; the zoo has ['tiny-a']" in err and "export" not in err
    # no dvc.lock records these artifacts (the stages ran by hand): refused without the flag
    monkeypatch.setattr(sys, "argv", ["predict", *base[:-1], "--question", "The _ flies.",
                                      "--choices", "a", "b"])  # fmt: skip
    with pytest.raises(SystemExit):
        run(command)
    err = capsys.readouterr().err
    assert "is not a DVC project" in err and "--allow-stale" in err


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pruned")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        write_params(folder, lambda p: (_edit(p), p["prune"].update(layers=1)))
        prune(mp)
        train_and_export(mp)
        fit_kfac(mp)
        tune_prior(mp)
        evaluate(mp)
    return folder


def test_predict_builds_the_pruned_model_as_evaluate_does(pruned_study):
    """With prune.layers 1 the stages fine-tune, fit and evaluate the model without the chosen
    layer; predict reads that choice and gives evaluate's predictions."""
    from lalora.study.predict import load

    choice = json.loads((pruned_study / AT.prune()).read_text())
    assert choice["layers"] == 1 and len(choice["removed"]) == 1
    predictor = load("tiny-a", "generated", root=pruned_study, allow_stale=True)
    assert len(predictor.laplace.model.base_model.model.model.layers) == 1
    examples = predictor.read(pruned_study / "data" / "generated" / "test.jsonl")
    saved, _, _ = load_predictions(pruned_study / AT.predictions(2))
    pred = predictor.predict(examples, "la_val")
    assert float((pred.probs - saved["la_val"]).abs().max()) <= 1e-10
    assert float((pred.map - saved["map"]).abs().max()) <= 1e-6


def test_the_layout_is_the_one_dvc_yaml_gives_the_stages():
    """Every path a stage's command line names is the Layout's, so the stages that read through
    the Layout (shift, aggregate, predict) read what the others wrote."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    item = {"model": "m", "dataset": "d", "step": 7}

    def args(name: str) -> dict[str, Path]:
        cmd = re.sub(r"\$\{item\.(\w+)\}", lambda g: str(item[g[1]]), stages[name]["cmd"])
        return {k: Path(v) for k, v in re.findall(r"--([\w-]+) (\S+)", cmd)}

    at = Layout("m", "d")
    assert args("prune") == {
        "model": Path("m"), "data": at.split("train"), "out": at.prune(),
        "curve": at.prune_curve("csv"), "plot": at.prune_curve("png"),
    }  # fmt: skip
    for name in ("finetune", "members", "fit_kfac", "tune_prior", "evaluate", "shift"):
        assert args(name)["prune"] == at.prune(), name
        assert (
            str(at.prune()).replace("m/d", "${item.model}/${item.dataset}") in stages[name]["deps"]
        ), name
    assert args("finetune") == {
        "model": Path("m"), "prune": at.prune(), "data": at.split("train"),
        "out": at.checkpoints(), "loss-csv": at.train_loss(), "usage": at.finetune_usage(),
    }  # fmt: skip
    assert args("members") | {"model": None, "prune": None} == {
        "model": None, "prune": None, "train": at.split("train"), "test": at.split("test"),
        "out": at.members(), "predictions": at.member_predictions(),
    }  # fmt: skip
    assert args("export")["out"] == at.adapter(7)
    assert args("export")["checkpoints"] == at.checkpoints()
    assert args("fit_kfac")["out"] == at.kfac(7) and args("fit_kfac")["adapter"] == at.adapter(7)
    assert args("fit_kfac")["data"] == at.split("train")
    tune = args("tune_prior")
    assert (tune["kfac"], tune["adapter"], tune["init"]) == (
        at.kfac(7),
        at.adapter(7),
        at.adapter(0),
    )
    assert (tune["val"], tune["out"]) == (at.split("val"), at.prior(7))
    ev = args("evaluate")
    assert (ev["adapter"], ev["kfac"], ev["prior"]) == (at.adapter(7), at.kfac(7), at.prior(7))
    assert (ev["data"], ev["out"], ev["predictions"]) == (
        at.split("test"),
        at.metrics(7),
        at.predictions(7),
    )
    shift = args("shift")
    assert (shift["root"], shift["out"]) == (at.root, at.shift_metrics())
    assert shift["predictions"] == at.shift_predictions()
    assert args("aggregate")["root"] == at.root
    for name in ("shift", "aggregate"):  # read through the Layout: they depend on its folders
        deps = {Path(re.sub(r"\$\{item\.(\w+)\}", lambda g: str(item[g[1]]), d))
                for d in stages[name]["deps"] if isinstance(d, str)}  # fmt: skip
        for folder in {"shift": [at.models / "adapters", at.models / "kfac", at.models / "prior",
                                 Path("data")],
                       "aggregate": [Path("metrics/checkpoints"), Path("metrics/shift"),
                                     Path("predictions")]}[name]:  # fmt: skip
            assert folder in deps, (name, folder)


def _readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Laplace-LoRA on your own PEFT model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_snippet_runs_as_written_and_gives_the_pipeline_s_probabilities(study):
    """Only the lines marked ``# yours`` get this test's model and data (the tiny base model
    saved as a folder, the study's step-2 adapter, its prepared splits)."""
    from lalora.config import ModelCard
    from lalora.data.files import read_split
    from lalora.models.zoo import load_card_model

    card = ModelCard(source="tiny", arch="llama")
    tok, base = load_card_model(card, seed=0)
    base.save_pretrained(study / "base")
    tok.save_pretrained(study / "base")
    splits = {s: read_split(study / "data" / "generated" / f"{s}.jsonl") for s in ("train", "val")}
    test = read_split(study / "data" / "generated" / "test.jsonl")
    mine = {
        "base, adapter": f"{str(study / 'base')!r}, {str(study / AT.adapter(2))!r}",
        "train": repr([(e.prompt, e.label) for e in splits["train"].examples]),
        "val": repr([(e.prompt, e.label) for e in splits["val"].examples]),
        "test": repr([e.prompt for e in test.examples]),
    }
    lines = []
    for line in _readme_snippet().splitlines():
        if "# yours" in line:
            name = line.split(" = ", 1)[0]
            line = f"{name} = {mine.pop(name)}"
        lines.append(line)
    assert not mine, f"the README's snippet no longer marks {sorted(mine)} as yours"
    scope: dict = {}
    exec(compile("\n".join(lines), "README.md", "exec"), scope)
    saved, _, _ = load_predictions(study / AT.predictions(2))
    prediction = scope["prediction"]
    assert float((prediction.probs - saved["la_val"]).abs().max()) <= 1e-8
    assert float((prediction.map - saved["map"]).abs().max()) <= 1e-6
    assert prediction.std.shape == (len(test.examples), 1)
    assert not torch.allclose(prediction.probs, prediction.map)


def test_a_changed_param_is_named_by_its_leaf_key_even_under_a_name_with_a_dot():
    """The keys named in a staleness message: each changed leaf under a key the lock recorded,
    matched whole, so a zoo name holding a dot (qwen2.5) is found and nothing else is named."""
    from lalora.config.edits import flatten
    from lalora.study.predict import _changed_keys

    now = flatten({"kfac": {"rank": 12, "seed": 0}, "zoo": {"qwen2.5": {"r": 16, "alpha": 16}}})
    recorded = {"kfac.rank": 10, "kfac.seed": 0, "zoo.qwen2.5": {"r": 8, "alpha": 16}}
    assert _changed_keys(recorded, now) == ["kfac.rank", "zoo.qwen2.5.r"]
    assert _changed_keys({"prune.layers": 0}, now) == ["prune.layers"]  # gone from params.yaml
    assert _changed_keys({"kfac.seed": 0}, now) == []
