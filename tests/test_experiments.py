"""lalora.scale.experiments: the rows of ``dvc exp show --json``, the files each commit holds, and
the two markdown tables, on a git repository written here (no DVC run)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lalora.core.paths import Layout
from lalora.scale.experiments import Experiment, ExperimentsError, listed, markdown, read


def _row(rev: str, name: str | None, params: dict) -> dict:
    return {"rev": rev, "name": name, "data": {"params": {"params.yaml": {"data": params}}}}


def test_listed_keeps_the_baseline_and_its_experiments_not_the_workspace():
    queued = {"executor": {"state": "queued"}, "revs": [_row("d" * 40, "later", {})]}
    shown = [
        _row("workspace", None, {"finetune": {"lr": 1}}),
        {**_row("a" * 40, "main", {"finetune": {"lr": 0.003}}), "experiments": [
            {"executor": {"state": "success"},
             "revs": [_row("b" * 40, "lp16", {"finetune": {"lr": 0.00075}})]},
            {"executor": None, "revs": [_row("e" * 40, "pulled", {})]},
            {"revs": [{"rev": "c" * 40, "name": "no data", "data": None}]}, queued]},
    ]  # fmt: skip
    exps = listed(shown)
    assert [(e.name, e.rev[0], e.params.get("finetune", {}).get("lr")) for e in exps] == [
        ("main", "a", 0.003),
        ("lp16", "b", 0.00075),
        ("pulled", "e", None),
    ]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def _commit(repo: Path, files: dict[Path, str], message: str) -> str:
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return _git(repo, "rev-parse", "HEAD")


def _scores(nll: float) -> str:
    return json.dumps(
        {
            "map": {"acc": 0.5, "nll": nll, "ece": 0.25, "brier": 0.3},
            "la_val": {"acc": 0.5, "nll": nll / 2, "ece": 0.1, "brier": 0.2},
        }
    )


def test_read_and_markdown_show_each_commit_checkpoint_by_checkpoint(tmp_path):
    repo = tmp_path
    _git(repo, "init", "-q")
    at = Layout("m", "d")
    usage = {"wall_s": 12.345, "cpu_s": 20.0, "s_per_step": 6.1, "peak_host_gb": 1.5}
    base = _commit(repo, {at.metrics(0): _scores(0.8), at.metrics(2): _scores(0.6),
                          at.finetune_usage(): json.dumps(usage)}, "baseline")  # fmt: skip
    curve = "layer,distance,removed\n0,0.4,0\n1,0.2,1\n2,0.3,1\n3,0.5,0\n"
    pruned = _commit(repo, {at.metrics(2): _scores(0.4), at.prune_curve("csv"): curve},
                     "experiment")  # fmt: skip
    params = {"checkpoints": [0, 2], "finetune": {"lora_plus_ratio": 1.0, "lr": 0.0001875}}
    exps = [
        Experiment("main", base, {**params, "prune": {"layers": 0}}),
        Experiment("prune-2", pruned, {**params, "prune": {"layers": 2}}),
    ]
    runs, scores = read(repo, exps, "m", "d", ("map", "la_val"))
    # the experiment's commit kept the baseline's step-0 file and usage, its own step 2
    got = {(r["experiment"], r["step"], r["method"]): r["nll"] for r in scores.to_dict("records")}
    assert got == {("main", 0, "map"): 0.8, ("main", 0, "la_val"): 0.4,
                   ("main", 2, "map"): 0.6, ("main", 2, "la_val"): 0.3,
                   ("prune-2", 0, "map"): 0.8, ("prune-2", 0, "la_val"): 0.4,
                   ("prune-2", 2, "map"): 0.4, ("prune-2", 2, "la_val"): 0.2}  # fmt: skip
    keys = ["finetune.lora_plus_ratio", "finetune.lr", "prune.layers"]
    text = markdown(exps, keys, runs, scores, ("map", "la_val"), "m", "d")
    lines = text.splitlines()
    assert lines[0] == "# m on d: 2 runs"
    assert "| main | 1 | 0.0001875 | 0 | none | 12.3 | 20.0 | 6.10 | 1.50 |" in lines
    assert "| prune-2 | 1 | 0.0001875 | 2 | 1..2 | 12.3 | 20.0 | 6.10 | 1.50 |" in lines
    assert "| experiment | step | MAP ACC | MAP NLL | MAP ECE | LA (val) ACC | LA (val) NLL " \
           "| LA (val) ECE |" in lines  # fmt: skip
    assert "| prune-2 | 2 | 0.500 | 0.400 | 0.250 | 0.500 | 0.200 | 0.100 |" in lines


def test_read_names_the_experiment_without_metrics(tmp_path):
    _git(tmp_path, "init", "-q")
    rev = _commit(tmp_path, {Path("README"): "x"}, "empty")
    with pytest.raises(ExperimentsError, match=r"experiment e1 \(.{8}\) has no metrics of m on d"):
        read(tmp_path, [Experiment("e1", rev, {"checkpoints": [0]})], "m", "d", ("map",))
