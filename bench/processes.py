"""Data parallel on this machine: the wall time of the ``fit_kfac`` and ``evaluate`` stages of a
finished study at 1 and 2 processes (gloo, 1 thread each, plus the 1-process default threads),
the outputs' largest difference from the 1-process run, and each stage's communication volume.

    python -m bench.processes                      # the default study's last checkpoint
    python -m bench.processes --step 400 --repeats 3 --out bench/processes.md

Runs the stage scripts through :mod:`lalora.scale.launch` exactly as ``dvc repro`` does, on the
artifacts under ``models/`` and ``data/`` (run ``dvc repro`` first); writes only under a
temporary folder. Repeats alternate the settings, and times are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lalora.config import LaunchConfig, load_params
from lalora.core.io import atomic_write_text, load_predictions
from lalora.laplace.posterior import Posterior
from lalora.scale.launch import command

SETTINGS = {  # name: (processes, threads per process; 0 = torch's default)
    "1 process, default threads": (1, 0),
    "1 process, 1 thread": (1, 1),
    "2 processes, 1 thread each": (2, 1),
}


def run_stage(script: str, args: list[str], nproc: int, threads: int, params: Path) -> float:
    cmd, env = command(
        script, [*args, "--params", str(params)], LaunchConfig(nproc, "gloo", threads)
    )
    if threads == 0:
        env.pop("OMP_NUM_THREADS", None)
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def _rel(f, g) -> float:
    """Largest relative difference of the eigenvalues of two modules' factors."""
    return max(
        float((getattr(f, s).evals - getattr(g, s).evals).abs().max())
        / max(float(getattr(g, s).evals.abs().max()), 1e-300)
        for s in ("a", "g")
    )


def factor_entries(post: Posterior) -> int:
    """Entries of the statistics reduced across processes: a d x d sum per dense side, a d x s
    sketch per low-rank one (sketch size s = 2 k + 10 for the saved rank k)."""
    seen, total = set(), 0
    for f in post.modules.values():
        for side in (f.a, f.g):
            if id(side) in seen:
                continue
            seen.add(id(side))
            total += side.dim**2 if side.rank == side.dim else side.dim * (2 * side.rank + 10)
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="the settings to time (the first is the reference)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench/processes.md"))
    return p.parse_args(argv)


def stage_args(model: str, dataset: str, step: int, out: Path) -> dict[str, list[str]]:
    """The arguments of ``fit_kfac`` and ``evaluate`` on the study's artifacts of ``step``,
    writing under ``out``."""
    root = Path("models") / model / dataset
    adapter = str(root / "adapters" / f"step-{step}")
    return {
        "fit_kfac": ["--model", model, "--adapter", adapter, "--data",
                     f"data/{dataset}/train.jsonl", "--out", str(out / "kfac")],
        "evaluate": ["--model", model, "--dataset", dataset, "--step", str(step),
                     "--adapter", adapter, "--kfac", str(root / "kfac" / f"step-{step}"),
                     "--prior", str(root / "prior" / f"step-{step}.json"),
                     "--data", f"data/{dataset}/test.jsonl", "--out", str(out / "metrics.json"),
                     "--predictions", str(out / "pred.safetensors")],
    }  # fmt: skip


def measure(args: argparse.Namespace, model: str, dataset: str, step: int, local: Path):
    """Each setting's stage times (``(stage, setting) -> [seconds]``), each output's largest
    difference from the first setting's, and the first setting's factors."""
    times: dict[tuple[str, str], list[float]] = {}
    diffs: dict[tuple[str, str], float] = {}
    ref: dict[str, object] = {}
    for _ in range(args.repeats):
        for name in args.settings:
            nproc, threads = SETTINGS[name]
            out = local.parent / name.replace(" ", "_").replace(",", "")
            for stage, stage_argv in stage_args(model, dataset, step, out).items():
                t = run_stage(f"stages/{stage}.py", stage_argv, nproc, threads, local)
                times.setdefault((stage, name), []).append(t)
            post = Posterior.load(out / "kfac")
            probs = load_predictions(out / "pred.safetensors")[0]
            if not ref:
                ref = {"post": post, "probs": probs}
                continue
            d = max(_rel(post.modules[n], ref["post"].modules[n]) for n in post.modules)
            diffs[("fit_kfac", name)] = max(diffs.get(("fit_kfac", name), 0.0), d)
            d = max(float((probs[m] - ref["probs"][m]).abs().max()) for m in probs)
            diffs[("evaluate", name)] = max(diffs.get(("evaluate", name), 0.0), d)
    return times, diffs, ref["post"]


def render(args, model: str, dataset: str, step: int, times, diffs, post: Posterior) -> str:
    # the speed-up is against one thread (the reference of the differences is the first setting)
    base_name = (
        "1 process, 1 thread" if "1 process, 1 thread" in args.settings else args.settings[0]
    )
    entries = factor_entries(post)
    n_lora = sum(f.a.dim * f.g.dim for f in post.modules.values())
    lines = [
        f"## Processes: {model} on {dataset}, step {step}, {os.cpu_count()} cores, gloo",
        "",
        f"Command: `python -m bench.processes --step {step} --repeats {args.repeats}`. Median "
        f"wall time of the stage (process start and model load included) over {args.repeats} "
        "repeat(s); the difference is against the first setting (factor eigenvalues: the "
        "largest relative difference; predictions: the largest absolute difference of any "
        "method's probability).",
        "",
        f"| stage | setting | median s | vs {base_name} | difference |",
        "|---|---|---:|---:|---:|",
    ]
    for stage in ("fit_kfac", "evaluate"):
        base = statistics.median(times[(stage, base_name)])
        for name in args.settings:
            t = statistics.median(times[(stage, name)])
            diff = diffs.get((stage, name))
            lines.append(
                f"| {stage} | {name} | {t:.1f} | {base / t:.2f}x | "
                + ("reference" if diff is None else f"{diff:.1e}")
                + " |"
            )
    lines += [
        "",
        "Communication per stage (all-reduce or gather over the processes):",
        "",
        f"- finetune: the LoRA gradients, {n_lora:,} float32 values = {n_lora * 4 / 1e6:.2f} MB "
        "per step, and the loss;",
        f"- fit_kfac: the statistics once, {entries:,} float64 values = {entries * 8 / 1e6:.1f} "
        "MB, and three counts;",
        "- evaluate, tune_prior, shift: the per-example logits, covariances and Jacobian "
        "projections of each process's share, gathered once.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    model = args.model or params.models[0]
    dataset = args.dataset or params.datasets[0]
    step = params.checkpoints[-1] if args.step is None else args.step
    tmp = Path(tempfile.mkdtemp(prefix="lalora-processes-"))
    raw = yaml.safe_load(args.params.read_text())
    raw["launch"] = {"nproc_per_node": 1, "backend": "gloo", "threads": 0}
    local = tmp / "params.yaml"
    local.write_text(yaml.safe_dump(raw))
    times, diffs, post = measure(args, model, dataset, step, local)
    text = render(args, model, dataset, step, times, diffs, post)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
