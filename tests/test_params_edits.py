"""Hand edits of params.yaml and ``dvc exp run -S`` (Hydra composition): the run refuses,
naming each value it would drop, rather than silently composing over it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lalora.config import compose
from lalora.config.edits import LostEdit, lost_edits

ROOT = Path(__file__).resolve().parents[1]


def test_lost_edits_are_the_hand_made_values_no_override_sets():
    base = {"a": {"lr": 1.0, "steps": 2, "targets": ["q", "v"]}, "model": {"name": "x"}}
    # an override of a.steps and a group switch that changes model.name
    composed = {"a": {"lr": 1.0, "steps": 5, "targets": ["q", "v"]}, "model": {"name": "y"}}
    held = {
        "a": {"lr": 0.5, "steps": 3, "targets": ["q"], "extra": 1},  # three edits, one new key
        "model": {"name": "z"},
    }
    assert lost_edits(held, base, composed) == [
        LostEdit("a.extra", 1, "<absent>"),
        LostEdit("a.lr", 0.5, 1.0),
        LostEdit("a.targets", ["q"], ["q", "v"]),
    ]
    # what the composition gives, or what an override sets, is never reported
    assert lost_edits(composed, base, composed) == []
    assert lost_edits(base, base, composed) == []
    # a key removed by hand comes back: reported as held <absent>
    assert lost_edits({"a": {"lr": 1.0, "steps": 5}, "model": {"name": "y"}}, base, composed) == [
        LostEdit("a.targets", "<absent>", ["q", "v"])
    ]


def _dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )


def test_dvc_exp_run_refuses_to_drop_a_hand_edit_and_keeps_the_file(tmp_path):
    """A hand edit of finetune.lr, then ``dvc exp run --queue -S finetune.seed=1``: refused
    (nothing queued, params.yaml as edited), the message names the key, its value and conf/;
    an override of that very key, or a clean params.yaml with a group switch, is queued."""
    repo = tmp_path / "study"
    for rel in ("conf", "hydra_plugins", ".dvc/config", "dvc.yaml", "params.yaml", ".gitignore"):
        src, dst = ROOT / rel, repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dst)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "study"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params == compose(repo / "conf")
    params["finetune"]["lr"] = 0.00123
    edited = yaml.safe_dump(params, sort_keys=False)
    (repo / "params.yaml").write_text(edited)

    res = _dvc(repo, env, "exp", "run", "--queue", "-n", "dropped", "-S", "finetune.seed=1")
    assert res.returncode != 0
    assert "finetune.lr: 0.00123 (this run would use" in res.stderr, res.stderr
    assert "conf/" in res.stderr and "Traceback" not in res.stderr
    assert (repo / "params.yaml").read_text() == edited
    assert "dropped" not in _dvc(repo, env, "queue", "status").stdout

    res = _dvc(repo, env, "exp", "run", "--queue", "-n", "set", "-S", "finetune.lr=0.002")
    assert res.returncode == 0, res.stderr
    subprocess.run(["git", "checkout", "params.yaml"], cwd=repo, check=True, capture_output=True)
    res = _dvc(repo, env, "exp", "run", "--queue", "-n", "phi2", "-S", "model=phi2")
    assert res.returncode == 0, res.stderr
    queued = _dvc(repo, env, "queue", "status").stdout
    assert "set" in queued and "phi2" in queued
