"""Tiny DVC studies for the end-to-end tests: a git repository holding the project's tracked
files with tiny params (:func:`make_repo`), the commands the tests run in it, and the two-model
study that several test modules share (:func:`two_model_study`, built once per session by the
``two_model_study`` fixture of ``conftest.py``; each module works on its own copy)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "source": "tiny",
    "targets": ["q_proj", "v_proj"],
    "lm_head": True,
    "r": 8,
    "alpha": 16,
    "dropout": 0.1,
    "quantization": "none",
    "dtype": "float32",
}


def sh(args: list[str], cwd: Path, env: dict) -> str:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res.stdout + res.stderr


def repro(repo: Path, env: dict) -> set[str]:
    """The stages ``dvc repro`` ran, but ``sources`` (it hashes the raw data at every repro)."""
    out = sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert "sources" in ran
    return ran - {"sources"}


def stale(repo: Path, env: dict) -> set[str]:
    """The stages ``dvc status`` finds out of date (their own deps or params changed), but
    ``sources``: what ``dvc repro`` would run first."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=env,
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {k.split(":")[-1] for k in json.loads(out)} - {"sources"}


def edit_params(repo: Path, fn) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    fn(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(tmp_path_factory, edit) -> tuple[Path, dict]:
    """A git repository holding the project's tracked files, with params edited by ``edit``.

    The project's ``dvc.lock`` is left out: it records the default study, none of whose stages
    is current at the tiny params, and DVC rewrites the whole lock file after every stage, so
    carrying it made each stage of the tiny studies seconds slower."""
    repo = tmp_path_factory.mktemp("study")
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if f != "dvc.lock" and (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(repo / "src"),
    }

    def tiny(params):
        params["finetune"].update(steps=2, save_every=2, batch_size=4)
        params["checkpoints"] = [0, 2]
        params["kfac"].update(batch_size=6)
        params["prior"].update(log10_min=-10.0, log10_max=12.0)
        params["predictive"].update(samples=100)
        params["evaluate"].update(
            methods=["la", "la_val", "llla", "temperature", "mc_dropout"],
            mc_samples=2,
            ensemble_last=2,
            bootstrap=50,
        )
        edit(repo, params)

    edit_params(repo, tiny)
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"],
    ):
        sh(args, repo, env)
    return repo, env


def experiments(shown: list[dict]) -> list[dict]:
    """Every row of ``dvc exp show --json``: the baselines and the experiments under them."""
    rows = []
    for base in shown:
        rows.append(base)
        for group in base.get("experiments") or []:
            rows.extend(group.get("revs", []))
    return rows


def two_models(_, params) -> None:
    """The shared study's params: tiny-a (Llama) and tiny-b (Phi-3, fused qkv_proj) on the
    generated task (16 train, 4 of them validation, 8 test), checkpoints 0, 1 and 2."""
    params["models"] = ["tiny-a", "tiny-b"]
    params["zoo"] = {
        "tiny-a": {**TINY, "arch": "llama"},
        "tiny-b": {**TINY, "arch": "phi3", "targets": ["qkv_proj"]},
    }
    params["data"]["generated"].update(n_train=16, n_test=8, val_size=4)
    # a checkpoint after every step: the grid test kills a run after step 1 and resumes it
    params["finetune"].update(save_every=1)
    params["checkpoints"] = [0, 1, 2]


@dataclass(frozen=True)
class Study:
    """A finished tiny study: its folder, the environment its commands run in, the stages its
    first ``dvc repro`` ran (``sources`` aside) and where each stage's time went."""

    path: Path
    env: dict
    ran: frozenset[str]
    times: Path  # the first repro's LALORA_TIMES lines (lalora.core.timing)


def build_two_model_study(tmp_path_factory) -> Study:
    repo, env = make_repo(tmp_path_factory, two_models)
    times = repo.parent / "times.jsonl"
    ran = repro(repo, {**env, "LALORA_TIMES": str(times)})
    return Study(repo, env, frozenset(ran), times)


def copy_study(study: Study, tmp_path_factory, name: str) -> tuple[Path, dict]:
    """A copy of ``study`` (work tree, git repository and DVC cache) that a test may change;
    its commands import the copy's own ``src``."""
    dest = tmp_path_factory.mktemp(name) / study.path.name
    shutil.copytree(study.path, dest, symlinks=True)
    return dest, {**study.env, "PYTHONPATH": str(dest / "src")}
