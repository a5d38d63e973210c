"""A stage's start-up: what it imports before it has work to do. Every heavy stage starts
through ``lalora.scale.launch``, and each branch runs prune, members and shift even when they have
nothing to do (``prune.layers`` 0, ``ensemble.members`` 1, no shift target); none of these
imports torch then, which takes seconds of every stage's start on a small machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_study import DATA, ROOT, write_params

# runs stage scripts in one process, as ``python stages/<script> ...`` would, then says whether
# torch was imported
RUNNER = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as err:
        if err.code:
            raise
print("torch" in sys.modules)
"""


def _run(folder: Path, *commands: list[str]) -> bool:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    argv = [[str(ROOT / "stages" / c[0]), *map(str, c[1:])] for c in commands]
    res = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argv)], cwd=folder, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1] == "True"


def test_the_launcher_and_the_stage_helpers_import_no_torch():
    code = ("import sys, lalora.launch, lalora.scale.launch, lalora.runtime.distributed, "
            "lalora.models.prune, lalora.training.members, lalora.predict, "
            "lalora.study.shift; print(sorted(m for m in ('torch', 'transformers', 'peft') "
            "if m in sys.modules))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_stages_with_nothing_to_do_write_their_outputs_without_torch(tmp_path):
    write_params(tmp_path)
    prune = tmp_path / "prune.json"
    imported = _run(
        tmp_path,
        ["prepare.py", "--dataset", "generated", "--out", DATA],
        ["prune.py", "--model", "tiny-a", "--data", DATA / "train.jsonl", "--out", prune,
         "--curve", "curve.csv", "--plot", "curve.png"],
        ["members.py", "--model", "tiny-a", "--prune", prune, "--train", DATA / "train.jsonl",
         "--test", DATA / "test.jsonl", "--out", "members", "--predictions", "member-preds"],
        ["shift.py", "--model", "tiny-a", "--prune", prune, "--dataset", "generated",
         "--root", ".", "--out", "shift.json", "--predictions", "shift-preds"],
    )  # fmt: skip
    assert not imported
    assert json.loads(prune.read_text())["removed"] == []
    assert (tmp_path / "curve.csv").read_text() == "layer,distance,removed\n"
    assert (tmp_path / "curve.png").stat().st_size > 0
    for folder in ("members", "member-preds"):
        assert json.loads((tmp_path / folder / "members.json").read_text()) == {"seeds": []}
    assert json.loads((tmp_path / "shift.json").read_text()) == {}
    assert json.loads((tmp_path / "shift-preds" / "targets.json").read_text()) == []
