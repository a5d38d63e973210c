"""Data parallel on torch.distributed (gloo, 2 CPU processes under torchrun) equals the
1-process run: fine-tuning (to float32 round-off), factors (dense and Nystrom to float64
round-off, incremental SVD within its approximation), predictive covariances and MC dropout;
a 2-process run killed after a checkpoint resumes with 1 process to the uninterrupted result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lalora.config import LaunchConfig
from lalora.laplace.marglik import log_marginal_likelihood
from lalora.laplace.posterior import Posterior
from lalora.runtime.distributed import SINGLE, Dist, bounds, map_batches, shard
from lalora.scale.launch import command

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
# float32 round-off of a few AdamW steps: the gradient sums differ in their order of addition
ADAPTER_ATOL = 1e-6


def worker(out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd, env = command(WORKER, [str(out), *args], LaunchConfig(nproc_per_node=nproc, threads=1))
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ok(worker(root / "one", 1))
    weights = root / "one" / "ckpt" / "step-6" / "adapter" / "adapter_model.safetensors"
    ok(worker(root / "two", 2, "--weights", str(weights)))
    killed = worker(root / "killed", 2, "--stop-at", "3")
    assert killed.returncode != 0 and "killed after step 3" in killed.stderr
    ok(worker(root / "killed", 1, "--weights", str(weights)))  # resumed with 1 process
    return root


def adapter(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "ckpt" / f"step-{step}" / "adapter" / "adapter_model.safetensors"))


def test_shards_are_contiguous_and_cover_everything():
    items = list(range(7))
    parts = [shard(items, Dist(r, 3)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert [bounds(7, Dist(r, 3)) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="2 batches for 3 processes"):
        shard([0, 1], Dist(0, 3))
    assert [shard([0, 1], Dist(r, 3), allow_empty=True) for r in range(3)] == [[0], [1], []]


def test_map_batches_passes_global_indices_and_keeps_the_order():
    out = map_batches(lambda i, x: torch.tensor([[i, x], [i, -x]]), [10, 20, 30], SINGLE)
    assert out.tolist() == [[0, 10], [0, -10], [1, 20], [1, -20], [2, 30], [2, -30]]


def test_launch_runs_python_or_torchrun_from_params():
    cmd, _ = command("stages/x.py", ["--a", "1"], LaunchConfig())
    assert cmd == [sys.executable, "stages/x.py", "--a", "1"]
    cmd, env = command("stages/x.py", [], LaunchConfig(nproc_per_node=4, backend="gloo"))
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert env["LALORA_BACKEND"] == "gloo"


def test_heavy_stages_launch_through_params_and_do_not_depend_on_them():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("finetune", "members", "fit_kfac", "tune_prior", "evaluate", "shift"):
        assert stages[name]["cmd"].startswith(f"python -m lalora.launch stages/{name}.py"), name
    for name in ("export", "aggregate"):  # one process whatever nproc_per_node, warm if asked
        assert stages[name]["cmd"].startswith(
            f"python -m lalora.launch --one-process stages/{name}.py"
        ), name
    for name, stage in stages.items():
        assert not any(str(p).startswith("launch") for p in stage.get("params", [])), name


def test_two_processes_fine_tune_to_the_one_process_adapter(runs):
    for step in (2, 4, 6):
        one, two = adapter(runs / "one", step), adapter(runs / "two", step)
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=ADAPTER_ATOL)
    start, end = adapter(runs / "one", 0), adapter(runs / "one", 6)
    assert max(float((start[k] - end[k]).abs().max()) for k in start) > 100 * ADAPTER_ATOL


def test_killed_two_process_run_resumes_with_one_process(runs):
    for step in (2, 4, 6):
        one, resumed = adapter(runs / "one", step), adapter(runs / "killed", step)
        for k in one:
            torch.testing.assert_close(resumed[k], one[k], rtol=0, atol=ADAPTER_ATOL)


def _dense(f) -> torch.Tensor:
    return f.dense() if f.dim <= 512 else torch.diag(f.evals)


def test_two_process_factors_equal_the_one_process_factors(runs):
    exact = Posterior.load(runs / "one" / "dense")
    for update in ("dense", "nystrom", "svd"):
        one, two = Posterior.load(runs / "one" / update), Posterior.load(runs / "two" / update)
        assert (one.n_data, one.log_likelihood) == pytest.approx((two.n_data, two.log_likelihood))
        prior = {n: 2.0 for n in one.modules}
        log_z = [log_marginal_likelihood(p.with_prior(prior)) for p in (one, two)]
        assert log_z[1] == pytest.approx(log_z[0], rel=1e-6 if update == "svd" else 1e-10)
        for name, f1 in one.modules.items():
            f2 = two.modules[name]
            assert f1.n_rows == f2.n_rows
            for side in ("a", "g"):
                a, b = getattr(f1, side), getattr(f2, side)
                if update != "svd" or a.rank == a.dim:
                    torch.testing.assert_close(_dense(b), _dense(a), rtol=1e-10, atol=1e-12)
                elif a.dim <= 512:  # merged roots: as close to F as the streamed root
                    ref = getattr(exact.modules[name], side).dense()
                    best = float(torch.linalg.eigvalsh(ref).flip(0)[a.rank :].sum())
                    err = float(torch.linalg.matrix_norm(b.dense() - ref, "nuc"))
                    assert err <= 1.2 * best + 1e-12, (name, side, err, best)


def test_two_process_predictions_equal_the_one_process_predictions(runs):
    one = load_file(str(runs / "one" / "predict.safetensors"))
    two = load_file(str(runs / "two" / "predict.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        if k.endswith("svd"):  # factors from merged roots: within the SVD's approximation
            torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-8, msg=k)
        elif not k.startswith("proj."):  # (eigenbases of near-equal eigenvalues may rotate)
            torch.testing.assert_close(two[k], one[k], rtol=1e-10, atol=1e-12, msg=k)
