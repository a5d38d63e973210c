"""Which cells of a grid have a job in flight, so that ``submit`` never sends a cell twice.

Each submission leaves a record, ``.dvc/tmp/grid/<grid>/running/<cell>.json`` (job id, the
executor, the submitting host, for a local job its process id, and the commit it runs). A later
``submit`` of the same commit asks, for every cell not yet landed, whether its recorded job is
still pending or running (a job of another commit is not this commit's cell): SLURM
through submitit (``sacct``), a local job through its process on this host. A job whose state
cannot be read is taken as in flight, and the message says how to clear it (``scancel`` the job,
or delete the record).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lalora.core.io import atomic_write_json

# SLURM states of a job that has not ended (a preempted job is requeued under its own id)
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING",
                    "STAGE_OUT", "PREEMPTED"})  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One submission of a cell: the job's id, its executor (``slurm`` or ``local``), the host
    that submitted it, the local job's process id (0 on SLURM), when (seconds since epoch) and
    the commit the job runs."""

    cell: str
    job_id: str
    executor: str
    host: str
    pid: int
    submitted: float
    commit: str = ""


def folder(logs: Path) -> Path:
    return logs / "running"


def record(logs: Path, cell: str, job, commit: str = "") -> Record:
    """Keep a record of ``job`` (a submitit job) for ``cell`` at ``commit``; returns it."""
    import submitit

    local = isinstance(job, submitit.local.local.LocalJob)
    rec = Record(cell, str(job.job_id), "local" if local else "slurm", socket.gethostname(),
                 int(job.job_id) if local else 0, time.time(), commit)  # fmt: skip
    atomic_write_json(folder(logs) / f"{cell}.json", asdict(rec))
    return rec


def forget(logs: Path, cell: str) -> None:
    (folder(logs) / f"{cell}.json").unlink(missing_ok=True)


def slurm_state(logs: Path, job_id: str) -> str:
    """SLURM's state of ``job_id`` as submitit reads it (``UNKNOWN`` when it cannot)."""
    import submitit

    try:
        return str(submitit.SlurmJob(folder=logs, job_id=job_id).state).split()[0].upper()
    except Exception:  # sacct missing or failing: submitit's own word for it
        return "UNKNOWN"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reason(
    rec: Record,
    logs: Path,
    state: Callable[[Path, str], str] = slurm_state,
    alive: Callable[[int], bool] = process_alive,
) -> str | None:
    """Why ``rec``'s job counts as in flight (one line), or None when it has ended."""
    where = folder(logs) / f"{rec.cell}.json"
    if rec.executor == "local":
        if rec.host != socket.gethostname():
            return (f"local job {rec.job_id} on {rec.host}, which this host cannot see; "
                    f"stop it there or delete {where}")  # fmt: skip
        return f"running as local job {rec.job_id}" if alive(rec.pid) else None
    now = state(logs, rec.job_id)
    if now in ACTIVE:
        return f"{now.lower()} as SLURM job {rec.job_id}"
    if now == "UNKNOWN":
        return (f"SLURM job {rec.job_id}, whose state sacct cannot tell; `scancel {rec.job_id}` "
                f"or delete {where} to submit it again")  # fmt: skip
    return None


def in_flight(logs: Path, cells: list[str], commit: str = "", **checks) -> dict[str, str]:
    """{cell: why it is in flight} for the ``cells`` whose recorded job, of ``commit`` (any
    commit where ""), has not ended; the records of ended jobs are deleted. ``checks``:
    :func:`reason`'s ``state`` and ``alive``."""
    out = {}
    for cell in cells:
        path = folder(logs) / f"{cell}.json"
        try:
            rec = Record(**json.loads(path.read_text()))
        except FileNotFoundError:
            continue
        except (ValueError, TypeError):  # a damaged record holds no job to wait for
            path.unlink(missing_ok=True)
            continue
        if commit and rec.commit != commit:
            continue  # another commit's job: its experiment is not this commit's cell
        why = reason(rec, logs, **checks)
        if why is None:
            path.unlink(missing_ok=True)
        else:
            out[cell] = why
    return out
