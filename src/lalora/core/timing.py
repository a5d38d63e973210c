"""Where a stage's wall time goes: start-up (from the start of its process, or of the
``lalora.scale.launch`` process that started it, to the stage's ``main``), model load (every
:func:`lalora.models.zoo.load_base_model` call) and the rest, its compute. With
``LALORA_TIMES=<file>`` each stage appends one JSON line to that file; without it nothing is
written. ``python -m bench.stage_times`` turns the lines into the README's per-stage table."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

LAUNCH_START = "LALORA_LAUNCH_START"  # set by lalora.scale.launch for the stage it starts
_spent: dict[str, float] = {}


def process_start() -> float:
    """When this process started (seconds since the epoch, from /proc), or now where /proc is
    absent."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def timed(phase: str) -> Callable:
    """Decorate a function whose calls count towards ``phase`` of the stage's time."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _spent[phase] = _spent.get(phase, 0.0) + time.perf_counter() - start

        return inner

    return wrap


def record(stage: str, argv: list[str], main_start: float) -> None:
    """Append this stage's line (stage, argv, start-up, each phase, compute, total) to
    ``$LALORA_TIMES``, if set."""
    path = os.environ.get("LALORA_TIMES")
    if not path:
        return
    end = time.time()
    start = float(os.environ.get(LAUNCH_START) or process_start())
    phases = {k: round(v, 3) for k, v in _spent.items()}
    line = {
        "stage": stage, "argv": argv, "startup_s": round(main_start - start, 3), **phases,
        "compute_s": round(end - main_start - sum(_spent.values()), 3),
        "total_s": round(end - start, 3),
    }  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
