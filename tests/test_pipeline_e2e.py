"""End to end: the DVC pipeline on a tiny configuration in a temporary git repository.

Asserts that every stage runs, that a second ``dvc repro`` runs nothing, that editing one
model's card reruns only that model's branch, that ``prior.*`` reruns only tune_prior and
evaluate, that ``kfac.*`` reruns from fit_kfac on, and that ``dvc metrics show`` has the metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from bench.stage_times import table as stage_table
from tests.studies import (
    copy_study,
    edit_params,
    repro,
    sh,
    stale,
)

pytestmark = pytest.mark.slow
LAUNCHED = ("finetune", "members", "fit_kfac", "tune_prior", "evaluate", "shift")


@pytest.fixture(scope="module")
def repo(two_model_study, tmp_path_factory):
    """This module's copy of the shared two-model study, finished by its first ``dvc repro``."""
    return copy_study(two_model_study, tmp_path_factory, "two-models")


def test_pipeline_runs_caches_and_reruns_only_what_changed(two_model_study, repo):
    repo, env = repo
    stages_a = {
        f"{s}@tiny-a-generated-{k}"
        for s in ("export", "fit_kfac", "tune_prior", "evaluate")
        for k in (0, 1, 2)
    } | {"finetune@tiny-a-generated", "members@tiny-a-generated"}
    stages_b = {s.replace("tiny-a", "tiny-b") for s in stages_a}
    shifts = {"shift@tiny-a-generated", "shift@tiny-b-generated"}
    prunes = {"prune@tiny-a-generated", "prune@tiny-b-generated"}
    # the shared study's first repro ran every stage
    assert two_model_study.ran == {"prepare@generated", "aggregate"} | stages_a | stages_b | (
        shifts | prunes
    )
    # every stage recorded its time; the 1-process stages after the first started warm
    lines = [json.loads(x) for x in two_model_study.times.read_text().splitlines()]
    assert sorted(x["stage"] for x in lines) == sorted(
        s.split("@")[0] for s in two_model_study.ran | {"sources"}
    )
    heavy = [x for x in lines if x["stage"] in ("finetune", "fit_kfac", "evaluate", "shift")]
    assert all("model_load_s" in x for x in heavy if x["stage"] != "shift")
    launched = [x for x in lines if x["stage"] in LAUNCHED]
    assert sum(x["startup_s"] < 3.0 for x in launched) >= len(launched) - 1, launched
    # each figure is rounded to 1 ms: their sum is the total to within 2 ms
    parts = ("startup_s", "model_load_s", "compute_s")
    assert all(abs(x["total_s"] - sum(x.get(k, 0.0) for k in parts)) < 2e-3 for x in lines)
    assert f"| all stages | {len(lines)} |" in stage_table(lines)
    for f in (
        "metrics/table2.md",
        "metrics/table3.md",
        "plots/figure1.png",
        "plots/reliability.png",
        "models/tiny-a/generated/adapters/step-2/adapter_config.json",
    ):
        assert (repo / f).exists(), f
    assert repro(repo, env) == set()

    # one model's card invalidates exactly that model's branch (what DVC would rerun first;
    # the rest follows from their outputs), and undoing it leaves nothing to do
    edit_params(repo, lambda p: p["zoo"]["tiny-b"].update(dropout=0.2))
    assert stale(repo, env) == stages_b - {f"export@tiny-b-generated-{k}" for k in (0, 1, 2)} | {
        "shift@tiny-b-generated",
        "prune@tiny-b-generated",
    }
    edit_params(repo, lambda p: p["zoo"]["tiny-b"].update(dropout=0.1))
    assert stale(repo, env) == set()
    # prune.layers: the prune stages first (each model's branch follows from its prune.json)
    edit_params(repo, lambda p: p["prune"].update(layers=1))
    assert stale(repo, env) == {"prune@tiny-a-generated", "prune@tiny-b-generated"}
    edit_params(repo, lambda p: p["prune"].update(layers=0))
    assert stale(repo, env) == set()
    assert json.loads((repo / "models/tiny-a/generated/prune.json").read_text())["removed"] == []

    # keys only aggregate reads rerun only aggregate
    edit_params(repo, lambda p: p["evaluate"].update(bootstrap=60, ensemble_last=1))
    assert repro(repo, env) == {"aggregate"}

    # a prior change invalidates every tune_prior and nothing else; a kfac change every fit_kfac
    every = stages_a | stages_b
    saved = yaml.safe_load((repo / "params.yaml").read_text())
    edit_params(repo, lambda p: p["prior"].update(grid=31, evidence="linear"))
    assert stale(repo, env) == {s for s in every if s.startswith("tune_prior")}
    edit_params(repo, lambda p: p["kfac"].update(rank=5, normalisation="sequences_padded"))
    assert stale(repo, env) == {s for s in every if s.startswith(("fit_kfac", "tune_prior"))}
    # one checkpoint's prior under the new settings: its factor fit and prior run, nothing else
    args = [sys.executable, "-m", "dvc", "repro", "tune_prior@tiny-a-generated-2"]
    ran = set(re.findall(r"Running stage '([^']+)'", sh(args, repo, env))) - {"sources"}
    assert ran == {"fit_kfac@tiny-a-generated-2", "tune_prior@tiny-a-generated-2"}
    prior = json.loads((repo / "models/tiny-a/generated/prior/step-2.json").read_text())
    assert prior["evidence"] == "linear" and prior["normalisation"] == "sequences_padded"
    curvature = prior["methods"]["la"]["curvature"]
    assert curvature["delta_sq"] == pytest.approx(prior["methods"]["la"]["theta_sq"])
    assert 0 < prior["symmetry"]["share"] < 1 and prior["fisher_trace"] > 0
    post = json.loads((repo / "models/tiny-a/generated/kfac/step-2/posterior.json").read_text())
    assert post["normalisation"] == "sequences_padded"
    # back to the earlier settings: DVC's run cache restores those outputs, nothing runs
    edit_params(repo, lambda p: p.update(prior=saved["prior"], kfac=saved["kfac"]))
    assert repro(repo, env) == set()
    prior = json.loads((repo / "models/tiny-a/generated/prior/step-2.json").read_text())
    assert prior["evidence"] == "standard" and prior["normalisation"] == "rows"

    table = pd.read_csv(repo / "metrics" / "comparison.csv")
    # DVC's metric: every method of the comparison, with comparison.csv's values
    shown = json.loads(sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo, env))
    (workspace,) = shown.values()  # {"": {"data": {file: {"data": ...}}}}
    summary = workspace["data"]["metrics/summary.json"]["data"]
    keys = {"map", "la", "la_val", "llla", "temperature", "mc_dropout", "ensemble"}
    for model in ("tiny-a", "tiny-b"):
        assert keys <= set(summary[model]["generated"])
    for row in table.itertuples():
        entry = summary[row.model][row.dataset][row.key]
        assert entry[row.metric.lower()] == pytest.approx(row.value, rel=1e-12)
        if row.metric in ("NLL", "ECE"):
            k = row.metric.lower()
            assert entry[f"{k}_lo"] == pytest.approx(row.low, rel=1e-12)
    # DVC's plots: a series per model and per-checkpoint method, and the reliability bins
    plots = json.loads(sh([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo, env))
    names = ["MAP", "LA", "LA (val)", "LLLA", "Temperature scaling", "MC dropout"]
    for title, methods in (
        ("NLL against gradient steps", names),
        ("Reliability at the final checkpoint", [*names, "Checkpoint ensemble"]),
    ):
        series = {f"{m} generated {n}" for m in ("tiny-a", "tiny-b") for n in methods}
        content = plots["data"][title][0]["content"]
        values = content.get("data") or content["layer"][1]["data"]
        assert {v["series"] for v in values["values"]} == series, title
    expected = {
        "MAP", "LA", "LA (val)", "LLLA", "Temperature scaling", "MC dropout",
        "Checkpoint ensemble",
    }  # fmt: skip
    for model in ("tiny-a", "tiny-b"):
        rows = table[table.model == model]
        assert set(rows.method) == expected
        assert set(rows.metric) == {"ACC", "NLL", "ECE", "Brier"}
        assert ((rows.low <= rows.value + 1e-12) | (rows.metric == "ECE")).all()
        assert (rows.low <= rows.high).all()
    assert "| Checkpoint ensemble |" in (repo / "metrics" / "comparison.md").read_text()


def test_two_processes_rerun_nothing_and_reproduce_the_metrics(repo):
    """``launch.nproc_per_node`` is no stage's dependency; forced, tiny-a's last checkpoint
    rerun from its factor fit on under torchrun with 2 processes gives the 1-process metrics
    (fine-tuning on 2 processes: ``tests/test_distributed.py``)."""
    repo, env = repo
    repro(repo, env)
    path = repo / "metrics" / "checkpoints" / "tiny-a" / "generated" / "step-2.json"
    before = json.loads(path.read_text())
    edit_params(repo, lambda p: p["launch"].update(nproc_per_node=2))
    assert repro(repo, env) == set()
    args = [
        sys.executable,
        "-m",
        "dvc",
        "repro",
        "-f",
        "--downstream",
        "fit_kfac@tiny-a-generated-2",
    ]
    out = sh(args, repo, env)
    assert "launch: 2 processes (torchrun) for stages/evaluate.py" in out
    assert {"fit_kfac@tiny-a-generated-2", "evaluate@tiny-a-generated-2"} <= set(
        re.findall(r"Running stage '([^']+)'", out)
    )
    after = json.loads(path.read_text())
    assert after["prior_precision"] == pytest.approx(before["prior_precision"], rel=1e-9)
    for method in before["methods"]:
        for metric in ("acc", "nll", "ece", "brier"):
            assert after[method][metric] == pytest.approx(
                before[method][metric], rel=1e-4, abs=1e-6
            ), (method, metric)
    edit_params(repo, lambda p: p["launch"].update(nproc_per_node=1))


METHODS = ("MAP", "tem", "LA ", "row", "seq")  # the first letters of bench.priors' methods


def test_exact_check_and_prior_comparison_run_on_the_artifacts(repo):
    """bench.exact_laplace and bench.priors read a finished run's artifacts; the exact full-GGN
    row is its own reference (ratio 1) and every prior row has finite metrics."""
    repo, env = repo
    repro(repo, env)
    sh(
        [sys.executable, "-m", "bench.exact_laplace", "--model", "tiny-a", "--step", "2",
         "--kfac", "dense", "--out", "exact.md"],
        repo, env,
    )  # fmt: skip
    table = (repo / "exact.md").read_text()
    # the exact full GGN is its own reference (trace and variance ratio 1)
    assert re.search(
        r"\| exact GGN, full \| zero \| standard \| 1.00 \| [^|]+ \| [^|]+ \| [^|]+ \| [^|]+ "
        r"\| 1.000 \|",
        table,
    )
    for row in (
        "rows, layerwise prior | init | standard",
        "sequences_padded, scalar prior | zero",
        "exact GGN, full | init | linear_mode",
        "full | init | standard, symmetry removed",
    ):
        assert row in table, row
    sh(
        [sys.executable, "-m", "bench.priors", "--model", "tiny-a", "--out", "priors.md",
         "--json", "study/tiny-s0.json", "--note", "tiny"],
        repo, env,
    )  # fmt: skip
    lines = (repo / "priors.md").read_text().splitlines()
    rows = [r for r in lines if r.startswith("| 2 |") and r.split(" | ")[1][:3] in METHODS]
    assert len(rows) == 3 + 12 and not any("nan" in r for r in lines)
    result = json.loads((repo / "study" / "tiny-s0.json").read_text())
    last = result["steps"][-1]
    assert {(v["normalisation"], v["evidence"], v["mean"]) for v in last["variants"]} == {
        (n, e, m)
        for n in ("rows", "sequences", "sequences_padded")
        for e in ("standard", "linear")
        for m in ("zero", "init")
    }
    assert last["mechanism"]["trace_ratio_padded_to_rows"] > 1
    from bench.study_table import write_table

    text = write_table(repo / "study", repo / "study.md")
    assert "| sequences_padded | standard | zero |" in text and "## tiny (seeds 0)" in text
    # bench.processes on the same artifacts: the stages as dvc repro starts them, one setting
    sh([sys.executable, "-m", "bench.processes", "--model", "tiny-a", "--step", "2",
        "--settings", "1 process, 1 thread", "--out", "processes.md"], repo, env)  # fmt: skip
    table = (repo / "processes.md").read_text()
    for stage in ("fit_kfac", "evaluate"):
        assert re.search(rf"\| {stage} \| 1 process, 1 thread \| [\d.]+ \| 1\.00x \| reference \|",
                         table), table  # fmt: skip
    assert "- fit_kfac: the statistics once" in table


def test_predict_refuses_artifacts_dvc_finds_stale_and_names_the_stage(repo):
    """After a params edit or a code edit that DVC would rerun, ``lalora.predict`` refuses the
    old artifacts, naming the stage, why, and the command; ``--allow-stale`` predicts from them
    as they are (the same numbers as before the edit)."""
    repo, env = repo
    repro(repo, env)
    cmd = [sys.executable, "-m", "lalora.predict", "--model", "tiny-a", "--dataset", "generated",
           "--question", "Of the owl and the sofa, only the _ is alive.", "--choices", "owl",
           "sofa"]  # fmt: skip
    fresh = sh(cmd, repo, env)
    assert "logit contrast std" in fresh

    def refused(*needles: str, stale_ok: bool = True) -> None:
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        said = " ".join(res.stderr.split())  # the message is wrapped to the terminal
        for needle in ("are stale", "dvc repro tune_prior@tiny-a-generated-2", "--allow-stale",
                       *needles):  # fmt: skip
            assert needle in said, (needle, said)
        if stale_ok:
            assert sh([*cmd, "--allow-stale"], repo, env) == fresh

    params = (repo / "params.yaml").read_text()
    edit_params(repo, lambda p: p["kfac"].update(rank=3))
    refused("fit_kfac@tiny-a-generated-2", "kfac.rank")
    (repo / "params.yaml").write_text(params)
    kfac = repo / "src" / "lalora" / "laplace" / "kfac.py"
    code = kfac.read_text()
    kfac.write_text(code + "\n# an edit\n")
    refused("fit_kfac@tiny-a-generated-2", "src/lalora/laplace/kfac.py", stale_ok=False)
    kfac.write_text(code)
    assert sh(cmd, repo, env) == fresh
