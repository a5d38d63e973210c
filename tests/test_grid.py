"""The study across machines: a DVC remote shared by two clones, a grid of experiments run as
submitit jobs (its local executor) that push to a git remote and a DVC remote, collected in
another clone; a job killed mid fine-tune resumes from its mirrored checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lalora.config import compose
from lalora.scale.collect import markdown, summarise, summary_rows
from lalora.scale.grid import Baseline, GridError, cell_params, load_grid, plan
from lalora.scale.remote import Mirror, RemoteError, check_plugin
from tests.studies import copy_study, edit_params, experiments

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj) if not isinstance(obj, str) else obj)
    return path


def test_the_paper_grid_has_its_jobs_and_hours(capsys):
    grid = load_grid(ROOT / "conf" / "sweep" / "paper.yaml")
    rows, table = plan(ROOT, grid)
    assert len(rows) == 4 * 6 * 3 == len({c.name for c, _ in rows})
    cell, res = rows[0]
    assert cell.overrides[:3] == ("model=llama2-7b", "data=winogrande_s", "finetune.seed=0")
    assert "finetune.steps=2500" in cell.overrides
    assert res.gpus == 1 and res.timeout_min > 60 * res.hours
    assert "total: 72 jobs" in table
    hours = sum(r.hours for _, r in rows)
    assert f"{hours:.1f} GPU-hours" in table


def test_resources_follow_the_card_and_the_overrides(tmp_path):
    spec = yaml.safe_load((ROOT / "conf" / "sweep" / "paper.yaml").read_text())
    spec.update(models=["llama2-7b", "phi2"], datasets=["obqa"], seeds=[0],
                resources={"partition": "a100", "timeout_min": 99})  # fmt: skip
    rows, _ = plan(ROOT, load_grid(write(tmp_path / "g.yaml", spec)))
    (_, big), (_, small) = rows
    assert big.gpu_memory_gb > small.gpu_memory_gb and big.hours > small.hours
    assert big.partition == "a100" and big.timeout_min == small.timeout_min == 99


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"models": []}, "'models' must be a non-empty list"),
        ({"models": ["a b"]}, "not a plain name"),
        ({"seeds": ["x"]}, "'seeds' must be a list of integers"),
        ({"colour": 1}, "unknown key(s) ['colour']"),
        ({"resources": {"gpu": 2}}, "resources: unknown key(s) ['gpu']"),
        ({"overrides": ["finetune.lr"]}, "key=value"),
        ({"throughput_tflops": 0}, "positive number"),
        ({"models": ["smollm2-135m", "smollm2-135m"]}, "['smollm2-135m'] listed more than once"),
        ({"seeds": [0, 1, 0]}, "seeds: ['0'] listed more than once"),
        ({"axes": {"size": "x={}"}}, "unknown axis ['size']"),
        ({"axes": {"model": "model={}{name}"}}, "axes.model: 'model={}{name}' is not a template"),
    ],
)
def test_a_bad_grid_file_is_refused_by_name(tmp_path, edit, message):
    spec = {"name": "g", "models": ["smollm2-135m"], "datasets": ["generated"], **edit}
    with pytest.raises(GridError, match=None) as err:
        load_grid(write(tmp_path / "g.yaml", spec))
    assert message in str(err.value)


def test_a_cell_that_does_not_compose_is_named_and_an_edit_of_overrides_renames_the_cells(
    tmp_path,
):
    """An unknown model or override key is one message naming the cell; a cell's name carries
    a digest of its overrides, so results of other overrides never count as its own."""
    spec = {"name": "g", "models": ["smollm2-135m"], "datasets": ["generated"]}
    for edit, message in (({"models": ["nosuch"]}, "its overrides do not compose"),
                          ({"overrides": ["finetune.nosuch=1"]}, "do not compose")):  # fmt: skip
        with pytest.raises(GridError, match=message) as err:
            plan(ROOT, load_grid(write(tmp_path / "g.yaml", {**spec, **edit})))
        assert str(err.value).startswith("cell g-")
    (a,) = load_grid(write(tmp_path / "g.yaml", spec)).cells()
    (b,) = load_grid(
        write(tmp_path / "g.yaml", {**spec, "overrides": ["finetune.lr=1e-3"]})
    ).cells()
    assert a.name.startswith("g-smollm2-135m-generated-s0-") and a.name != b.name
    (again,) = load_grid(write(tmp_path / "g.yaml", spec)).cells()
    assert again.name == a.name


def test_a_hand_edit_of_params_that_the_cells_would_drop_is_refused_before_submission(tmp_path):
    """With Hydra on, each cell's ``dvc exp run -S`` would compose params.yaml afresh: a value
    edited there by hand (finetune.lr) stops the plan, naming the cell, the key and conf/; a
    cell that sets that key itself is planned with its own value."""
    base = compose(ROOT / "conf")
    held = {**base, "finetune": {**base["finetune"], "lr": 0.00123}}
    spec = {"name": "g", "models": ["smollm2-135m"], "datasets": ["generated"]}
    (cell,) = load_grid(write(tmp_path / "g.yaml", spec)).cells()
    with pytest.raises(GridError, match=r"finetune\.lr: 0\.00123 \(this run would use") as err:
        cell_params(ROOT, cell, Baseline(True, held, base))
    assert str(err.value).startswith(f"cell {cell.name}: ") and "conf/" in str(err.value)
    assert cell_params(ROOT, cell, Baseline(True, base, base)).finetune.lr == base["finetune"]["lr"]
    (own,) = load_grid(
        write(tmp_path / "g.yaml", {**spec, "overrides": ["finetune.lr=0.002"]})
    ).cells()
    assert cell_params(ROOT, own, Baseline(True, held, base)).finetune.lr == 0.002


def test_a_cell_whose_job_is_pending_or_running_is_in_flight_until_the_job_ends(tmp_path):
    """A local job submitted by submitit is in flight while its process runs and not once it
    has ended (its record is then deleted); a SLURM job is in flight while SLURM says it is
    pending or running, and a job whose state cannot be read stays in flight, saying how to
    clear it."""
    import submitit

    from lalora.scale import inflight

    logs = tmp_path / "logs"
    job = submitit.LocalExecutor(folder=logs).submit(time.sleep, 4)
    rec = inflight.record(logs, "g-a", job, "c0ffee")
    assert rec.executor == "local" and rec.pid == int(job.job_id)
    running = {"g-a": f"running as local job {rec.pid}"}
    assert inflight.in_flight(logs, ["g-a", "g-b"], "c0ffee") == running
    # a job of another commit does not hold back this commit's cell
    assert inflight.in_flight(logs, ["g-a"], "beef") == {}
    assert inflight.in_flight(logs, ["g-a"]) == running
    job.result()
    deadline = time.monotonic() + 30
    while inflight.process_alive(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert inflight.in_flight(logs, ["g-a"]) == {}
    assert not (logs / "running" / "g-a.json").exists()

    slurm = inflight.Record("g-c", "4242", "slurm", "login1", 0, 0.0)
    cases = [("PENDING", "pending as SLURM job 4242"), ("RUNNING", "running as SLURM job 4242")]
    cases += [("COMPLETED", None), ("FAILED", None), ("CANCELLED", None)]
    for state, expected in cases:
        assert inflight.reason(slurm, logs, state=lambda *_, s=state: s) == expected
    unknown = inflight.reason(slurm, logs, state=lambda *_: "UNKNOWN")
    assert "scancel 4242" in unknown and "g-c.json" in unknown


def test_the_grid_table_is_the_mean_and_sample_sd_over_seeds(tmp_path):
    grid = load_grid(write(tmp_path / "g.yaml", {"name": "g", "models": ["m"],
                                                  "datasets": ["d"], "seeds": [0, 1]}))  # fmt: skip
    cells = pd.DataFrame([
        {"model": "m", "dataset": "d", "seed": s, "step": 4, "method": k, "acc": a, "nll": n,
         "ece": e, "brier": 0.1}
        for s, (a, n, e) in enumerate([(0.5, 0.7, 0.1), (0.7, 0.5, 0.3)])
        for k in ("la_val", "map")
    ])  # fmt: skip
    summary = summarise(cells)
    assert list(summary.method) == ["map", "la_val"]
    row = summary.iloc[0]
    assert row.seeds == 2 and row.nll_mean == pytest.approx(0.6)
    assert row.nll_sd == pytest.approx(0.1414213, rel=1e-6)
    assert "| m | d | MAP | 2 | 4 | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.200 ± 0.141 |" in markdown(
        grid, summary
    )


def test_a_plugin_remote_without_its_plugin_names_the_extra():
    pytest.importorskip("dvc")
    try:
        import dvc_s3  # noqa: F401
    except ImportError:
        with pytest.raises(RemoteError, match=r"pip install -e '\.\[s3\]'"):
            check_plugin("s3://bucket/study")
    check_plugin("/a/folder")


def dvc_init(folder: Path, remote: Path) -> None:
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["git", "init", "-q"], [*dvc, "init", "-q"],
                 [*dvc, "remote", "add", "-d", "r", str(remote)]):  # fmt: skip
        subprocess.run(args, cwd=folder, check=True, capture_output=True)


def test_the_mirror_restores_completed_checkpoints_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        p.mkdir()
        dvc_init(p, tmp_path / "remote")
    ck = a / "models" / "m" / "d" / "checkpoints"
    for step in (0, 2):
        (ck / f"step-{step}" / "adapter").mkdir(parents=True)
        (ck / f"step-{step}" / "trainer.json").write_text(json.dumps({"step": step}))
        (ck / f"step-{step}" / "adapter" / "w.bin").write_bytes(bytes(range(step, 200)))
    (ck / ".step-4.staging-1").mkdir()  # an interrupted save: never mirrored
    (ck / "step-6").mkdir()  # no trainer.json: not a checkpoint
    patterns = ("models/m/d/checkpoints/step-*", "models/m/d/members/seed-*/step-*")
    sent = Mirror(a, "g/cell", patterns).push()
    assert sent == ["models/m/d/checkpoints/step-0", "models/m/d/checkpoints/step-2"]
    assert Mirror(a, "g/cell", patterns).push() != []  # a new job sends again
    got = Mirror(b, "g/cell", patterns).restore()
    assert got == sent
    for step in (0, 2):
        for f in ("trainer.json", "adapter/w.bin"):
            rel = f"models/m/d/checkpoints/step-{step}/{f}"
            assert (b / rel).read_bytes() == (a / rel).read_bytes()
    assert not (b / "models/m/d/checkpoints/step-6").exists()
    assert Mirror(b, "g/other", patterns).restore() == []


# --- end to end ---------------------------------------------------------------------------


def sh(args, cwd: Path, env: dict) -> str:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}:\n{res.stdout[-4000:]}\n"
                             f"{res.stderr[-4000:]}")  # fmt: skip
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def study(two_model_study, tmp_path_factory):
    """Clone A: a copy of the shared tiny study (two tiny models, 2 fine-tuning steps, already
    reproduced), with a bare git remote and a folder DVC remote; hydra off, so -S edits
    params.yaml."""
    a, env = copy_study(two_model_study, tmp_path_factory, "grid")
    top = a.parent
    bare, remote = top / "origin.git", top / "dvc-remote"
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q", "--bare", "--initial-branch=main", str(bare)], top, env)
    sh([*dvc, "config", "hydra.enabled", "false"], a, env)
    sh([sys.executable, "-m", "lalora.remote", str(remote)], a, env)
    sh(["git", "remote", "add", "origin", str(bare)], a, env)
    return a, env, bare, remote


def commit_and_push(repo: Path, env: dict, message: str) -> None:
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo, env)
    sh(["git", "push", "-q", "origin", "HEAD:main"], repo, env)


def clone(study, name: str) -> Path:
    a, env, bare, remote = study
    b = a.parent / name
    sh(["git", "clone", "-q", str(bare), str(b)], a.parent, env)
    sh([sys.executable, "-m", "lalora.remote", str(remote)], b, env)
    return b


@pytest.mark.slow
def test_a_pulled_study_reruns_nothing_and_its_checkpoints_are_the_same_run(study):
    a, env, _, _ = study
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "repro"], a, env)
    sh([*dvc, "push"], a, env)
    commit_and_push(a, env, "study")
    b = clone(study, "b")
    benv = {**env, "PYTHONPATH": str(b / "src")}
    sh([*dvc, "pull"], b, benv)
    out = sh([*dvc, "repro"], b, benv)
    import re

    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"sources"}, out
    for rel in ("predictions/tiny-a/generated/step-2.safetensors",
                "models/tiny-a/generated/kfac/step-2/factors.safetensors",
                "metrics/summary.json"):  # fmt: skip
        if (a / rel).exists():
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # the pulled checkpoints are taken as this run's: a forced fine-tune resumes at the last
    # one (nothing saved again, nothing moved aside) and leaves the study up to date
    ck = b / "models" / "tiny-a" / "generated" / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ck.glob("step-*/trainer.json")}
    sh([*dvc, "repro", "-f", "-s", "finetune@tiny-a-generated"], b, benv)
    assert {p: p.stat().st_mtime_ns for p in ck.glob("step-*/trainer.json")} == before
    assert not list(ck.parent.glob("checkpoints.stale-*"))
    status = json.loads(sh([*dvc, "status", "--json"], b, benv).split("\n", 1)[0] or "{}")
    assert set(status) <= {"sources"}, status


GRID = {
    "name": "g",
    "models": ["tiny-a", "tiny-b"],
    "datasets": ["generated"],
    "seeds": [0],
    "axes": {"model": "models=[{}]", "dataset": "datasets=[{}]"},
}


@pytest.mark.slow
def test_a_grid_of_jobs_lands_in_the_collecting_clone_as_run_one_by_one(two_model_study, study):
    """submitit's local executor runs the 2 x 1 x 1 grid; the cell tiny-b is killed after its
    step-1 checkpoint and resubmitted, and resumes from the mirrored checkpoints. Clone C pulls
    every experiment; the rows of both cells, the killed one included, equal those of the
    shared study, which ran both models one after another (plain runs: nothing killed, nothing
    resumed). The commit the cells run has finetune.seed 7 and both models, so only the cells'
    own overrides (seed 0, one model) can give those rows."""
    a, env, _, _ = study
    grid_file = write(a / "conf" / "sweep" / "g.yaml", GRID)
    edit_params(a, lambda p: p["finetune"].update(seed=7))
    # the cells have the shared study's params: without its lock file and run cache they
    # compute everything afresh instead of restoring the shared study's outputs
    (a / "dvc.lock").unlink()
    shutil.rmtree(a / ".dvc" / "cache" / "runs")
    commit_and_push(a, env, "grid")
    names = {c.model: c.name for c in load_grid(grid_file).cells()}
    killed = names["tiny-b"]
    kenv = {**env, "PYTHONPATH": f"{ROOT / 'tests' / 'grid_kill'}{os.pathsep}{env['PYTHONPATH']}",
            "LALORA_TEST_KILL_CELL": killed, "LALORA_TEST_KILL_STEP": "1",
            "LALORA_TEST_KILL_MARKER": str(a.parent / "killed")}  # fmt: skip
    start = time.monotonic()
    out = sh([sys.executable, "-m", "lalora.grid", "submit", grid_file, "--executor", "local",
              "--wait", "--retries", "1", "--sync-seconds", "1"], a, kenv)  # fmt: skip
    print(f"grid submit: {time.monotonic() - start:.0f} s\n{out}")
    assert (a.parent / "killed").exists()
    assert f"{killed} failed; resubmitted" in out
    # each cell's last job is on record, and none is in flight once submit --wait returns
    from lalora.scale.inflight import in_flight

    logs = a / ".dvc" / "tmp" / "grid" / "g"
    assert {p.stem for p in (logs / "running").glob("*.json")} == set(names.values())
    assert in_flight(logs, list(names.values())) == {}
    assert out.count("landed") >= 2
    logs = a / ".dvc" / "tmp" / "grid" / "g"
    text = "\n".join(p.read_text() for p in logs.glob("*_log.out"))
    assert "restored models/tiny-b/generated/checkpoints/step-1 from the remote" in text
    assert "another configuration" not in text and "rejected" not in text
    assert text.count("Running stage 'finetune@") == 3 and "didn't change" not in text
    # every cell lands in the collecting clone's dvc exp show, with its own model only
    c = clone(study, "c")
    cenv = {**env, "PYTHONPATH": str(c / "src")}
    sh([sys.executable, "-m", "lalora.grid", "collect", c / "conf/sweep/g.yaml"], c, cenv)
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], c, cenv))
    runs = {e["name"]: e["data"] for e in experiments(shown) if e.get("name")}
    for model in ("tiny-a", "tiny-b"):
        data = runs[names[model]]
        assert set(data["metrics"]["metrics/summary.json"]["data"]) == {model}
        assert data["params"]["params.yaml"]["data"]["finetune"]["seed"] == 0
    # both cells, the killed one included, are the shared study's plain runs
    summary = json.loads((two_model_study.path / "metrics" / "summary.json").read_text())
    ref = pd.DataFrame([row for cell in load_grid(grid_file).cells()
                        for row in summary_rows(summary, cell)])  # fmt: skip
    got = pd.read_csv(c / "grids" / "g" / "cells.csv")
    assert len(got) >= 2 * 3 and set(ref.model) == {"tiny-a", "tiny-b"} and set(ref.step) == {2}
    pd.testing.assert_frame_equal(got, ref, rtol=1e-6)
    # grid.md is the table of cells.csv (its arithmetic: the unit test above)
    summary = summarise(got)
    assert (c / "grids/g/grid.md").read_text() == markdown(load_grid(grid_file), summary)
    assert (c / "grids/g/grid.png").stat().st_size > 0
