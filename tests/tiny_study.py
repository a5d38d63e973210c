"""A tiny study's artifacts made by the stage scripts themselves, in-process (no DVC): for
tests that count what a stage does or compare against what it wrote. Paths are the study's
(:class:`lalora.core.paths.Layout`), relative to the working directory."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import yaml

from lalora.core.paths import Layout

ROOT = Path(__file__).resolve().parents[1]
TINY_CARD = {
    "source": "tiny", "arch": "llama", "targets": ["q_proj", "v_proj"], "lm_head": True, "r": 8,
    "alpha": 16, "dropout": 0.1, "quantization": "none", "dtype": "float32",
}  # fmt: skip
AT = Layout("tiny-a", "generated")
DATA = Path("data/generated")


def write_params(folder: Path, edit=None) -> dict:
    """A tiny study's params.yaml in ``folder``: model tiny-a, the generated task (16 train,
    4 of them validation, 8 test), 2 fine-tuning steps, checkpoints 0 and 2."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = ["tiny-a"]
    params["zoo"] = {"tiny-a": dict(TINY_CARD)}
    params["data"]["generated"].update(n_train=16, n_test=8, val_size=4)
    params["finetune"].update(steps=2, save_every=2, batch_size=4)
    params["checkpoints"] = [0, 2]
    params["kfac"].update(batch_size=6)
    params["predictive"].update(samples=100)
    params["evaluate"].update(methods=["la", "la_val", "llla", "temperature", "mc_dropout"],
                              mc_samples=2)  # fmt: skip
    if edit is not None:
        edit(params)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def stage(script: str, args: list, monkeypatch) -> None:
    """Run ``stages/<script>`` with ``args`` in this process (the working directory is the
    study's)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(ROOT / "stages" / script), run_name="__main__")


def pruned() -> list:
    """``--prune`` with the prune stage's choice, where :func:`prune` made one."""
    return ["--prune", AT.prune()] if AT.prune().exists() else []


def prune(monkeypatch) -> None:
    """prepare, then the prune stage's choice of ``prune.layers`` layers (``AT.prune()``), which
    every later stage of this study then reads."""
    stage("prepare.py", ["--dataset", "generated", "--out", DATA], monkeypatch)
    stage("prune.py", ["--model", "tiny-a", "--data", DATA / "train.jsonl", "--out", AT.prune(),
                       "--curve", "prune.csv", "--plot", "prune.png"], monkeypatch)  # fmt: skip


def train_and_export(monkeypatch) -> None:
    """prepare, finetune and export the checkpoints 0 and 2."""
    stage("prepare.py", ["--dataset", "generated", "--out", DATA], monkeypatch)
    args = ["--model", "tiny-a", "--data", DATA / "train.jsonl", "--out", AT.checkpoints(),
            "--loss-csv", "loss.csv", *pruned()]  # fmt: skip
    stage("finetune.py", args, monkeypatch)
    for step in (0, 2):
        stage("export.py", ["--checkpoints", AT.checkpoints(), "--step", step,
                            "--out", AT.adapter(step)], monkeypatch)  # fmt: skip


def fit_kfac(monkeypatch) -> None:
    args = ["--model", "tiny-a", "--adapter", AT.adapter(2), "--data", DATA / "train.jsonl",
            "--out", AT.kfac(2), *pruned()]  # fmt: skip
    stage("fit_kfac.py", args, monkeypatch)


def tune_prior(monkeypatch) -> None:
    stage("tune_prior.py", ["--model", "tiny-a", "--kfac", AT.kfac(2), "--adapter", AT.adapter(2),
                            "--init", AT.adapter(0), "--val", DATA / "val.jsonl",
                            "--out", AT.prior(2), *pruned()], monkeypatch)  # fmt: skip


def evaluate(monkeypatch) -> None:
    stage("evaluate.py", ["--model", "tiny-a", "--dataset", "generated", "--step", 2,
                          "--adapter", AT.adapter(2), "--kfac", AT.kfac(2), "--prior", AT.prior(2),
                          "--data", DATA / "test.jsonl", "--out", AT.metrics(2),
                          "--predictions", AT.predictions(2), *pruned()], monkeypatch)  # fmt: skip
