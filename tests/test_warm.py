"""The warm start (:mod:`lalora.scale.warm`): a stage run by ``lalora.scale.launch`` in a fork of
the server behaves as ``python stages/<script> ...`` would (output, exit status, signals, working
directory, environment, code read fresh), and the server is keyed by what decides it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, time
import helper
print("argv", sys.argv[1:], "cwd", os.getcwd(), "colour", os.environ.get("COLOUR"))
print("preloaded", "torch" in sys.modules, "server", os.getppid(), "helper", helper.VALUE)
print("to stderr", file=sys.stderr)
what = sys.argv[1] if len(sys.argv) > 1 else ""
if what == "raise":
    raise ValueError("boom")
if what == "kill":
    os.kill(os.getpid(), 9)
if what == "sleep":
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(60)
sys.exit(int(what) if what.isdigit() else 0)
"""


@pytest.fixture(scope="module")
def folder():
    """A study-like folder (params.yaml, a stage script, a helper module on PYTHONPATH) and a
    socket folder of its own; the servers end when it is removed."""
    top = Path(tempfile.mkdtemp(prefix="lw-"))
    (top / "stages").mkdir()
    (top / "lib").mkdir()
    (top / "stages" / "s.py").write_text(SCRIPT)
    (top / "lib" / "helper.py").write_text("VALUE = 1\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["launch"]["warm_start"] = True
    (top / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{top / 'lib'}",
           "LALORA_WARM_DIR": str(top / "w"), "COLOUR": "red"}  # fmt: skip
    yield top, env
    shutil.rmtree(top)


def launch(
    top: Path, env: dict, *args: str, warm: bool = True, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    argv = ["-m", "lalora.launch", *flags] if warm else []
    return subprocess.run([sys.executable, *argv, "stages/s.py", *args], cwd=top, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def field(out: str, name: str) -> str:
    words = out.split()
    return words[words.index(name) + 1]


def test_a_stage_runs_in_the_server_as_python_would(folder):
    top, env = folder
    for args in ([], ["3"], ["kill"], ["raise"]):
        plain, warm = launch(top, env, *args, warm=False), launch(top, env, *args)
        assert warm.returncode == plain.returncode, args
        assert warm.stdout.replace("True", "False") == plain.stdout.replace(
            field(plain.stdout, "server"), field(warm.stdout, "server")
        )
        assert "preloaded True" in warm.stdout and "preloaded False" in plain.stdout
        assert warm.stderr.splitlines()[:1] == ["to stderr"]
    assert plain.stderr.splitlines()[-1] == warm.stderr.splitlines()[-1] == "ValueError: boom"
    # the traceback starts at the script's frames, as python's does
    assert "warm.py" not in warm.stderr and 'File "stages/s.py"' in warm.stderr
    assert launch(top, env, "kill").returncode == -signal.SIGKILL


def test_one_server_per_key_and_the_code_read_fresh(folder):
    top, env = folder
    first = launch(top, env).stdout
    (top / "lib" / "helper.py").write_text("VALUE = 2\n")
    second = launch(top, env).stdout
    assert field(first, "server") == field(second, "server")
    assert field(first, "helper") == "1" and field(second, "helper") == "2"
    other = launch(top, {**env, "COLOUR": "blue"}).stdout
    assert field(other, "server") != field(first, "server") and field(other, "colour") == "blue"
    assert len(list((top / "w").glob("lalora-warm-*/*.sock"))) == 2


def test_signals_reach_the_stage_and_a_dead_launcher_takes_it_along(folder, tmp_path):
    top, env = folder
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pid_file = tmp_path / f"pid-{sig}"
        proc = subprocess.Popen([sys.executable, "-m", "lalora.launch", "stages/s.py", "sleep",
                                 str(pid_file)], cwd=top, env=env)  # fmt: skip
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stage = int(pid_file.read_text())
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == -sig
        deadline = time.monotonic() + 10
        while _alive(stage):
            assert time.monotonic() < deadline, f"stage {stage} outlived its launcher ({sig})"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_no_warm_start_execs_the_script(folder):
    top, env = folder
    params = yaml.safe_load((top / "params.yaml").read_text())
    params["launch"]["warm_start"] = False
    (top / "off.yaml").write_text(yaml.safe_dump(params))
    out = launch(top, env, "--params", "off.yaml").stdout
    assert "preloaded False" in out


def test_one_process_ignores_nproc_per_node(folder):
    top, env = folder
    params = yaml.safe_load((top / "params.yaml").read_text())
    params["launch"]["nproc_per_node"] = 2
    (top / "two.yaml").write_text(yaml.safe_dump(params))
    res = launch(top, env, "--params", "two.yaml", flags=("--one-process",))
    assert res.returncode == 0 and res.stdout.count("argv") == 1 and "torchrun" not in res.stdout
    assert "preloaded True" in res.stdout
