"""End to end, a data=paper-shaped tiny study: two four-choice datasets (OpenBookQA and ARC
files of the official format) and the user's own three-choice one, every method, a deep
ensemble, the shift of one dataset to the other's test set, a raw data file as a dependency,
and two queued experiments run at once."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from lalora.core.io import load_predictions
from lalora.core.metrics import score
from lalora.core.tables import METHOD_NAMES
from tests.studies import TINY, experiments, make_repo, repro, sh

pytestmark = pytest.mark.slow


def four_choice_files(folder: Path, kind: str, seed: int) -> None:
    """Official-format ARC/OpenBookQA files (train 14, test 6; four choices) of random words."""
    gen = torch.Generator().manual_seed(seed)
    words = ["stone", "river", "light", "plant", "metal", "cloud", "seed", "sound", "heat"]
    for split, n in (("train", 14), ("test", 6)):
        rows = []
        for i in range(n):
            pick = torch.randint(0, len(words), (5,), generator=gen).tolist()
            choices = [{"text": words[k], "label": "ABCD"[j]} for j, k in enumerate(pick[:4])]
            question = {"stem": f"Which {words[pick[4]]} is it, {kind} {i}?", "choices": choices}
            key = "ABCD"[int(torch.randint(0, 4, (1,), generator=gen))]
            rows.append(
                json.dumps({"id": f"{kind}-{split}-{i}", "question": question, "answerKey": key})
            )
        name = f"ARC-Easy-{split.capitalize()}.jsonl" if kind == "arc" else f"{split}.jsonl"
        (folder / name).write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A data=paper-shaped study: two four-choice datasets, the first shifted to the second."""

    def paper_like(repo, params):
        # the raw files live beside the project, as ../shared/data does
        for kind in ("obqa", "arc"):
            (repo.parent / f"{repo.name}-data" / kind).mkdir(parents=True)
            four_choice_files(repo.parent / f"{repo.name}-data" / kind, kind, seed=len(kind))
        params["models"] = ["tiny-a"]
        params["zoo"] = {"tiny-a": {**TINY, "arch": "llama"}}
        common = dict(
            source="local", train_split="train", test_split="test", n_train=14, n_test=6,
            val_size=4, seed=0,
        )  # fmt: skip
        params["data"] = {
            "obqa": {**common, "name": "obqa", "local_dir": f"../{repo.name}-data/obqa"},
            "arc_e": {**common, "name": "arc_e", "local_dir": f"../{repo.name}-data/arc"},
        }
        # arc_small: a shift target the study does not train on (no prepare stage)
        params["data"]["arc_small"] = {**params["data"]["arc_e"], "n_test": 4, "seed": 1}
        # the user's own three-choice task: the shipped example's files, a subset
        params["data"]["custom3"] = {
            **common, "name": "custom", "local_dir": "conf/data/examples/properties3",
            "schema": {"n_choices": 3, "choices": ["choices"]},
        }  # fmt: skip
        params["datasets"] = ["obqa", "arc_e", "custom3"]
        params["shift"] = {"obqa": ["arc_e", "arc_small"]}
        params["ensemble"] = {"members": 2}

    return make_repo(tmp_path_factory, paper_like)


def test_four_choice_datasets_with_shift_run_every_method(shifted):
    """Two four-choice datasets (C - 1 = 3 backward passes) and a custom three-choice one (the
    user's own files), every method, and the shift of the first dataset's final checkpoint to
    the second's test set."""
    repo, env = shifted
    ran = repro(repo, env)
    assert {"prepare@obqa", "prepare@arc_e", "shift@tiny-a-obqa", "shift@tiny-a-arc_e"} <= ran
    t2 = pd.read_csv(repo / "metrics" / "table2.csv")
    assert list(t2.columns) == ["LLM", "Metric", "OBQA", "ARC-E", "custom3"]
    split = (repo / "data" / "obqa" / "test.jsonl").read_text().splitlines()
    assert json.loads(split[0]) == {"answers": [" A", " B", " C", " D"]}
    custom = (repo / "data" / "custom3" / "test.jsonl").read_text().splitlines()
    assert json.loads(custom[0]) == {"answers": [" A", " B", " C"]} and len(custom) == 7
    assert "C. " in json.loads(custom[1])["prompt"] and "D. " not in json.loads(custom[1])["prompt"]
    every = {"map", "la", "la_val", "llla", "temperature", "mc_dropout", "ensemble",
             "deep_ensemble"}  # fmt: skip
    mine = json.loads((repo / "metrics" / "summary.json").read_text())["tiny-a"]["custom3"]
    assert {k for k in every if "nll" in mine.get(k, {})} == every, mine
    assert all(0 <= mine[k]["ece"] <= 1 and mine[k]["nll"] > 0 for k in every)
    shift = json.loads((repo / "metrics" / "shift" / "tiny-a" / "obqa.json").read_text())
    assert set(shift) == {"arc_e", "arc_small"} and shift["arc_e"]["step"] == 2
    assert not any("arc_small" in s and s.startswith("prepare") for s in ran)
    assert {"map", "la", "la_val", "llla", "temperature", "mc_dropout"} <= set(shift["arc_e"])
    assert shift["arc_e"]["laplace_method"] == "la_val" and "laplace" not in shift["arc_e"]
    assert json.loads((repo / "metrics" / "shift" / "tiny-a" / "arc_e.json").read_text()) == {}
    table = pd.read_csv(repo / "metrics" / "shift.csv")
    pairs = set(zip(table.train, table.test, strict=True))
    assert pairs == {("OBQA", "ARC-E"), ("OBQA", "arc_small")}, pairs
    assert len(table) == 12  # MAP, LA, LA (val), LLLA, temperature, MC dropout per target
    summary = json.loads((repo / "metrics" / "summary.json").read_text())["tiny-a"]
    assert "shift" not in summary["arc_e"]
    for row in table.itertuples():
        key = {"ARC-E": "arc_e", "arc_small": "arc_small"}[row.test]
        method = next(k for k, v in METHOD_NAMES.items() if v == row.method)
        assert summary["obqa"]["shift"][key][method]["nll"] == pytest.approx(row.NLL, rel=1e-12)
    comparison = pd.read_csv(repo / "metrics" / "comparison.csv")
    assert set(comparison.dataset) == {"obqa", "arc_e", "custom3"}
    assert "Deep ensemble" in set(comparison.method)
    # the deep ensemble averages the final MAP and the seed-1 run, which differs from it
    final, _, ids = load_predictions(repo / "predictions/tiny-a/obqa/step-2.safetensors")
    extra, labels, extra_ids = load_predictions(
        repo / "predictions" / "members" / "tiny-a" / "obqa" / "seed-1.safetensors"
    )
    assert extra_ids == ids and not torch.allclose(extra["map"], final["map"])
    row = comparison[
        (comparison.dataset == "obqa")
        & (comparison.method == "Deep ensemble")
        & (comparison.metric == "NLL")
    ]
    mean = (final["map"] + extra["map"]) / 2
    assert row.value.item() == pytest.approx(score(mean, labels).nll, rel=1e-9)
    assert (repo / "models" / "tiny-a" / "obqa" / "members" / "seed-1" / "step-2").is_dir()
    assert repro(repo, env) == set()

    # a raw data file is a dependency: flip every answer of ARC's test file, and exactly the
    # stages that read ARC's test split rerun, with the new labels
    raw = repo.parent / f"{repo.name}-data" / "arc" / "ARC-Easy-Test.jsonl"
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    for row in rows:
        row["answerKey"] = "ABCD"[("ABCD".index(row["answerKey"]) + 1) % 4]
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    old = [json.loads(line)["label"] for line in split_lines(repo, "arc_e")]
    ran = repro(repo, env)
    assert {"prepare@arc_e", "evaluate@tiny-a-arc_e-2", "shift@tiny-a-obqa"} <= ran
    assert not any(s.startswith(("finetune", "export", "fit_kfac", "tune_prior")) for s in ran)
    assert not any(s.endswith(("obqa-0", "obqa-2")) or s == "prepare@obqa" for s in ran), ran
    new = [json.loads(line)["label"] for line in split_lines(repo, "arc_e")]
    assert new == [(label + 1) % 4 for label in old]
    assert repro(repo, env) == set()


def split_lines(repo: Path, dataset: str) -> list[str]:
    return (repo / "data" / dataset / "test.jsonl").read_text().splitlines()[1:]


def test_queued_experiments_run_two_at_once_and_both_land(shifted):
    """``dvc exp run --queue`` twice and ``dvc queue start --jobs 2``: both experiments run at
    the same time (each in its own workspace under .dvc/tmp/exps, where the relative raw-data
    folder ../<repo>-data still resolves beside the project) and ``dvc exp show`` lists both
    with metrics."""
    import time

    repo, env = shifted
    repro(repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    # -S edits params.yaml itself here (this tiny params.yaml is not the composition of conf/)
    sh([*dvc, "config", "hydra.enabled", "false"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], repo, env)
    # evaluate.bootstrap: only aggregate reruns; prune.layers, up to one checkpoint's evaluation
    # on obqa: that branch alone reruns, on the pruned model
    sh([*dvc, "exp", "run", "--queue", "-n", "boot-41", "-S", "evaluate.bootstrap=41"], repo, env)
    sh([*dvc, "exp", "run", "--queue", "-n", "prune-1", "-S", "prune.layers=1",
        "evaluate@tiny-a-obqa-2"], repo, env)  # fmt: skip
    sh([*dvc, "queue", "start", "--jobs", "2"], repo, env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = sh([*dvc, "queue", "status"], repo, env)
        if "Failed" in status:
            logs = [
                sh([*dvc, "queue", "logs", n], repo, env)[-3000:] for n in ("boot-41", "prune-1")
            ]
            raise AssertionError(f"{status}\n" + "\n".join(logs))
        if status.count("Success") == 2:
            break
        time.sleep(5)
    else:
        raise AssertionError(f"queue did not finish:\n{status}")
    shown = json.loads(sh([*dvc, "exp", "show", "--json"], repo, env))
    runs = {e["name"]: e["data"] for e in experiments(shown) if e.get("name")}
    methods = {"map", "la", "la_val", "llla", "temperature", "mc_dropout", "ensemble",
               "deep_ensemble"}  # fmt: skip
    summary = runs["boot-41"]["metrics"]["metrics/summary.json"]["data"]["tiny-a"]["obqa"]
    assert {k for k in methods if "nll" in summary.get(k, {})} == methods, summary
    assert runs["boot-41"]["params"]["params.yaml"]["data"]["evaluate"]["bootstrap"] == 41
    assert runs["prune-1"]["params"]["params.yaml"]["data"]["prune"]["layers"] == 1
    ran = set(re.findall(r"Running stage '([^']+)'", sh([*dvc, "queue", "logs", "prune-1"], repo,
                                                        env)))  # fmt: skip
    branch = {"prune@tiny-a-obqa", "finetune@tiny-a-obqa", "export@tiny-a-obqa-0",
              "export@tiny-a-obqa-2", "fit_kfac@tiny-a-obqa-2", "tune_prior@tiny-a-obqa-2",
              "evaluate@tiny-a-obqa-2"}  # fmt: skip
    assert ran - {"sources"} == branch
    ref = next(e["rev"] for e in experiments(shown) if e.get("name") == "prune-1")
    show = ["git", "show", f"{ref}:plots/prune/tiny-a/obqa.csv"]
    curve = pd.read_csv(io.StringIO(sh(show, repo, env)))  # d(l, 1), l = 0, 1: the tiny model's 2
    assert list(curve.layer) == [0, 1] and curve.removed.sum() == 1
    assert curve.distance[curve.removed == 1].item() == curve.distance.min() > 0
    show[-1] = f"{ref}:metrics/checkpoints/tiny-a/obqa/step-2.json"
    pruned_metrics = json.loads(sh(show, repo, env))
    unpruned = json.loads((repo / "metrics/checkpoints/tiny-a/obqa/step-2.json").read_text())
    assert pruned_metrics["map"]["nll"] != unpruned["map"]["nll"]
    # lalora.scale.experiments: every run of the commit checkpoint by checkpoint, as each committed
    # it
    sh([sys.executable, "-m", "lalora.experiments", "--model", "tiny-a", "--dataset", "obqa",
        "--params", "prune.layers", "--methods", "map", "la_val", "--out", "cmp.md"], repo,
       env)  # fmt: skip
    text = (repo / "cmp.md").read_text()
    runs_table, scores_table = (
        [line.split(" | ") for line in part.splitlines() if line.startswith("| ")][1:]
        for part in text.split("\n\n")[1:3]
    )  # fmt: skip
    branch = sh(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo, env).strip()
    assert [r[0].strip("| ") for r in runs_table] == [branch, "boot-41", "prune-1"]
    start = int(curve.layer[curve.removed == 1].item())
    assert [r[2] for r in runs_table] == ["none", "none", f"{start}..{start}"]
    usage = json.loads((repo / "metrics/finetune/tiny-a/obqa.json").read_text())
    assert usage["steps_run"] == 2 and usage["wall_s"] > 0 and usage["peak_host_gb"] > 0
    assert float(runs_table[0][3]) == pytest.approx(usage["wall_s"], abs=0.6)
    # MAP NLL at each checkpoint: the baseline's files, and prune-1's final one
    nll = {(r[0].strip("| "), int(r[1])): float(r[3]) for r in scores_table}
    for step in (0, 2):
        saved = json.loads((repo / f"metrics/checkpoints/tiny-a/obqa/step-{step}.json").read_text())
        assert nll[branch, step] == pytest.approx(saved["map"]["nll"], abs=5e-4), step
    assert nll["prune-1", 2] == pytest.approx(pruned_metrics["map"]["nll"], abs=5e-4)
    # the README's command comparing methods across experiments
    readme = (repo / "README.md").read_text()
    command = next(
        line.split("#")[0].split() for line in readme.splitlines()
        if line.startswith("dvc exp show --md --drop")
    )  # fmt: skip
    md = sh([sys.executable, "-m", *[a.strip("'") for a in command]], repo, env)
    header = md.splitlines()[0]
    assert "boot-41" in md and "prune-1" in md
    assert "tiny-a.obqa.la_val.nll" in header and "tiny-a.obqa.temperature.nll" in header
    assert "shift" not in header and "nll_lo" not in header
