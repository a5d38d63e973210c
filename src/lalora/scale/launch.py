"""Start a stage script as ``launch`` in params.yaml says: ``python -m lalora.launch
stages/fit_kfac.py --model ...`` replaces itself (``exec``) with ``python stages/fit_kfac.py
...`` when ``launch.nproc_per_node`` is 1 (or runs it in a fork of the warm-start server,
:mod:`lalora.scale.warm`, when ``launch.warm_start``), and with ``torchrun --standalone
--nproc-per-node N stages/fit_kfac.py ...`` (``python -m torch.distributed.run``; a free rendezvous
port, so concurrent experiments do not collide) when it is N > 1.

``python -m lalora.launch --one-process stages/export.py ...`` runs one process whatever N is
(warm where ``launch.warm_start`` says): the stages that are not data parallel.

The stage's ``cmd`` in dvc.yaml names neither N nor the backend, and no stage declares the
``launch`` keys: the results do not depend on them, so changing them reruns nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from lalora.config import LaunchConfig, load_params
from lalora.core.timing import LAUNCH_START, process_start

ONE_PROCESS = "--one-process"  # a stage that is not data parallel (export, aggregate)


def command(script: str, args: list[str], launch: LaunchConfig) -> tuple[list[str], dict]:
    """The argv and environment that run ``script args`` under ``launch``."""
    env = {**os.environ, LAUNCH_START: str(process_start())}
    if launch.threads:
        env["OMP_NUM_THREADS"] = str(launch.threads)
    if launch.nproc_per_node == 1:
        return [sys.executable, script, *args], env
    if launch.backend != "auto":
        env["LALORA_BACKEND"] = launch.backend
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={launch.nproc_per_node}", script, *args,
    ]  # fmt: skip
    return argv, env


def params_path(args: list[str]) -> Path:
    """The ``--params`` the stage will read (default ``params.yaml``)."""
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    one = argv[:1] == [ONE_PROCESS]
    argv = argv[1:] if one else argv
    if not argv or argv[0].startswith("-"):
        sys.exit(f"usage: python -m lalora.launch [{ONE_PROCESS}] STAGE_SCRIPT [ARGS...]")
    script, args = argv[0], argv[1:]
    from lalora.core.cli import run

    found: dict[str, LaunchConfig] = {}

    def read() -> None:
        launch = load_params(params_path(args)).launch
        if launch.nproc_per_node > 1 and launch.backend != "auto":
            from lalora.runtime.distributed import check_backend

            check_backend(launch.backend)
        found["launch"] = launch

    run(read, [script], timed=False)
    if one:
        found["launch"] = dataclasses.replace(found["launch"], nproc_per_node=1)
    cmd, env = command(script, args, found["launch"])
    if found["launch"].nproc_per_node > 1:
        print(f"launch: {found['launch'].nproc_per_node} processes (torchrun) for {script}")
    elif found["launch"].warm_start:
        from lalora.scale.warm import exit_as
        from lalora.scale.warm import run as run_warm

        code = run_warm(cmd[1:], env)
        if code is not None:
            exit_as(code)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
