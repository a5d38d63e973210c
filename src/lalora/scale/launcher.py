"""Submit a grid (:mod:`lalora.scale.grid`) through ``submitit``: one job per cell, on SLURM on a
cluster or as local processes here, each running its cell's study as a DVC experiment in a
workspace of its own and pushing it.

A job (:func:`run_cell`): ``git clone`` the git remote at the submitted commit into a fresh
folder (under ``workdir``: by default the project's ``.dvc/tmp/exps/grid``, where relative data
folders resolve as in DVC's own experiment workspaces, :func:`lalora.core.paths.resolve_dir`), point
its DVC remote and cache at the study's, restore the cell's mirrored fine-tuning checkpoints
(:class:`lalora.scale.remote.Mirror`), ``dvc exp run -n <cell> -S ...`` while a thread mirrors each
new checkpoint, then ``dvc exp push`` (the experiment's git ref to the git remote, its outputs
to the DVC remote) and delete the folder. On SLURM a preempted or timed-out job is requeued by
submitit (:class:`CellJob` is ``Checkpointable``; it mirrors what it has first); a failed job is
resubmitted up to ``retries`` times; either way the new attempt resumes fine-tuning from the
last mirrored checkpoint. :func:`submit` skips cells whose experiment the git remote already
holds for this commit and cells whose job of an earlier ``submit`` is still pending or running
(:mod:`lalora.scale.inflight`), so running it again submits only what has neither landed nor
is on its way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from lalora.core.paths import EXPERIMENTS, Layout
from lalora.scale import inflight
from lalora.scale.grid import Cell, Grid, Resources
from lalora.scale.remote import Mirror, RemoteError, configure, dvc

MIRRORED = ("checkpoints/step-*", "members/seed-*/step-*")


@dataclass(frozen=True)
class JobSpec:
    """What a job needs, all of it picklable: the cell, where the code (``git_url`` at
    ``commit``) and the artifacts (``dvc_url``; ``cache_dir``: the DVC cache to share, "" for
    the clone's own) live, where to make the workspace and how often to mirror."""

    grid: str
    cell: Cell
    git_url: str
    commit: str
    dvc_url: str
    workdir: str
    cache_dir: str = ""
    sync_seconds: float = 60.0

    def mirror(self, project: Path) -> Mirror:
        models = Layout(self.cell.model, self.cell.dataset, Path(".")).models
        return Mirror(project, f"{self.grid}/{self.cell.name}",
                      tuple(f"{models.as_posix()}/{p}" for p in MIRRORED))  # fmt: skip


def _git(args: list[str], cwd: Path) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RemoteError(f"git {' '.join(args)} failed in {cwd}:\n{res.stdout}{res.stderr}")
    return res.stdout


def _workspace(spec: JobSpec) -> Path:
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    ws = Path(tempfile.mkdtemp(prefix=f"{spec.cell.name}-", dir=spec.workdir))
    _git(["clone", "--quiet", spec.git_url, str(ws)], ws.parent)
    _git(["checkout", "--quiet", spec.commit], ws)
    configure(spec.dvc_url, ws)
    if spec.cache_dir:
        dvc(["cache", "dir", "--local", spec.cache_dir], ws)
    return ws


class _Syncer(threading.Thread):
    """Mirror new checkpoints every ``seconds`` until stopped."""

    def __init__(self, mirror: Mirror, seconds: float):
        super().__init__(daemon=True)
        self.mirror, self.seconds, self.stop = mirror, seconds, threading.Event()

    def sync(self) -> None:
        for rel in self.mirror.push():
            print(f"grid: mirrored {rel}", flush=True)

    def run(self) -> None:
        while not self.stop.wait(self.seconds):
            self.sync()


_ACTIVE: list[Mirror] = []


def run_cell(spec: JobSpec) -> str:
    """Run one cell's study and push it (module docstring); returns the experiment's name."""
    ws = _workspace(spec)
    mirror = spec.mirror(ws)
    _ACTIVE[:] = [mirror]
    syncer = _Syncer(mirror, spec.sync_seconds)
    try:
        for rel in mirror.restore():
            print(f"grid: restored {rel} from the remote", flush=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ws / "src"), env.get("PYTHONPATH"))
                                            if p)  # fmt: skip
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        syncer.start()
        args = [sys.executable, "-m", "dvc", "exp", "run", "-n", spec.cell.name]
        for item in spec.cell.overrides:
            args += ["-S", item]
        res = subprocess.run(args, cwd=ws, env=env)
        syncer.stop.set()
        syncer.join()
        syncer.sync()
        if res.returncode != 0:
            raise RuntimeError(f"cell {spec.cell.name}: dvc exp run failed ({res.returncode})")
        dvc(["exp", "push", "--force", "origin", spec.cell.name], ws)
        print(f"grid: pushed experiment {spec.cell.name}", flush=True)
        return spec.cell.name
    finally:
        syncer.stop.set()
        _ACTIVE.clear()
        shutil.rmtree(ws, ignore_errors=True)


class CellJob(submitit.helpers.Checkpointable):
    """The picklable job submitit runs; requeued on preemption or timeout (SLURM), after
    mirroring the checkpoints written so far."""

    def __call__(self, spec: JobSpec) -> str:
        return run_cell(spec)

    def checkpoint(self, spec: JobSpec):
        for mirror in _ACTIVE:
            mirror.push()
        return super().checkpoint(spec)


def remote_experiments(project: Path, git_remote: str = "origin") -> set[str]:
    """The experiments of ``project``'s HEAD that ``git_remote`` holds."""
    out = dvc(["exp", "list", git_remote, "--name-only"], project).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def executor(folder: Path, grid: Grid, kind: str, res: Resources) -> submitit.Executor:
    """submitit's executor (``kind``: slurm, local, or auto: SLURM where ``sbatch`` exists)
    with ``res`` and ``grid.executor`` (extra submitit parameters, e.g. ``slurm_setup``)."""
    cluster = None if kind == "auto" else kind
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    slurm = {k: v for k, v in {"slurm_partition": res.partition, "slurm_account": res.account,
             "slurm_qos": res.qos, "slurm_constraint": res.constraint}.items() if v}  # fmt: skip
    ex.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus,
                         cpus_per_task=res.cpus, mem_gb=res.memory_gb, nodes=1,
                         tasks_per_node=1, name=grid.name, **slurm, **grid.executor)  # fmt: skip
    return ex


def job_specs(project: Path, grid: Grid, cells: list[Cell], git_remote: str = "origin",
              workdir: str = "", sync_seconds: float = 60.0) -> list[JobSpec]:  # fmt: skip
    """One :class:`JobSpec` per cell, for ``project``'s HEAD, which must be clean and on
    ``git_remote`` (the jobs clone it from there)."""
    from lalora.scale.remote import url_of

    if _git(["status", "--porcelain", "--untracked-files=no"], project).strip():
        raise RemoteError(f"{project}: uncommitted changes; commit and push them first (the "
                          "jobs run what the git remote holds)")  # fmt: skip
    commit = _git(["rev-parse", "HEAD"], project).strip()
    git_url = _git(["remote", "get-url", git_remote], project).strip()
    _git(["fetch", "--quiet", git_remote], project)
    if not _git(["branch", "-r", "--contains", commit], project).strip():
        raise RemoteError(f"HEAD {commit[:8]} is not on {git_remote} ({git_url}); "
                          f"git push {git_remote} first")  # fmt: skip
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        cache = str(Path(repo.cache.local_cache_dir).resolve())
    dvc_url = url_of(project)
    workdir = workdir or str(project.resolve().joinpath(*EXPERIMENTS, "grid"))
    return [JobSpec(grid.name, c, git_url, commit, dvc_url, workdir, cache, sync_seconds)
            for c in cells]  # fmt: skip


def submit(project: Path, grid: Grid, rows: list[tuple[Cell, Resources]], kind: str = "auto",
           retries: int = 2, wait: bool = False, git_remote: str = "origin",
           workdir: str = "", sync_seconds: float = 60.0) -> dict[str, str]:  # fmt: skip
    """Submit every cell neither on the git remote nor in flight (a job of an earlier
    ``submit`` still pending or running, :mod:`lalora.scale.inflight`); with ``wait``, watch
    the jobs and resubmit a failed one up to ``retries`` times. Returns {cell: state}."""
    logs = project / ".dvc" / "tmp" / "grid" / grid.name
    landed = remote_experiments(project, git_remote)
    for cell, _ in rows:
        if cell.name in landed:
            inflight.forget(logs, cell.name)
    head = _git(["rev-parse", "HEAD"], project).strip()
    flight = inflight.in_flight(logs, [c.name for c, _ in rows if c.name not in landed], head)
    todo = [(c, r) for c, r in rows if c.name not in landed and c.name not in flight]
    specs = job_specs(project, grid, [c for c, _ in todo], git_remote, workdir, sync_seconds)
    states = {c.name: "landed" for c, _ in rows if c.name in landed}
    states.update({name: f"in flight: {why}" for name, why in flight.items()})
    for name, why in flight.items():
        print(f"grid: {name} not submitted again: {why}", flush=True)
    jobs = {}
    for spec, (cell, res) in zip(specs, todo, strict=True):
        job = executor(logs, grid, kind, res).submit(CellJob(), spec)
        inflight.record(logs, cell.name, job, spec.commit)
        jobs[cell.name] = (job, spec, res, 0)
        print(f"grid: submitted {cell.name} (job {job.job_id})", flush=True)
    while wait and jobs:
        time.sleep(2)
        for name, (job, spec, res, tries) in list(jobs.items()):
            if not job.done():
                continue
            del jobs[name]
            try:
                job.result()
                states[name] = "landed"
                print(f"grid: {name} landed", flush=True)
            except Exception as err:  # the job's own failure, reported by submitit
                if tries >= retries:
                    states[name] = f"failed: {str(err).strip().splitlines()[-1]}"
                    print(f"grid: {name} failed after {tries + 1} attempts", flush=True)
                    continue
                again = executor(logs, grid, kind, res).submit(CellJob(), spec)
                inflight.record(logs, name, again, spec.commit)
                jobs[name] = (again, spec, res, tries + 1)
                print(f"grid: {name} failed; resubmitted (job {again.job_id})", flush=True)
    states.update({name: "submitted" for name in jobs})
    return states
