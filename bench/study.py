"""The curvature-scale and prior study: every run of it, trained and scored, by one command.

    python -m bench.study                       # all runs: train, score, write bench/study.md
    python -m bench.study --runs default-s0 default-s1 --stage train
    python -m bench.study --stage table         # the table again from bench/study/*.json

Each run is a clone of this project's HEAD under ``--workdir`` (sharing this project's DVC
cache and ``../shared``) whose ``params.yaml`` is composed from ``conf/`` with the run's
overrides (as ``dvc exp run -S ...`` does) and in which ``dvc repro`` trains the adapters of its
checkpoints (the ``export@`` stages and what they need: no factor fit, prior or evaluation of the
pipeline's own). ``bench.priors`` then scores every variant post hoc on those adapters (one
factor fit per normalisation, one Jacobian pass per basis and split) and writes
``bench/study/<run>.json`` and ``.md``; the table over runs, with the mean and spread over the
default's fine-tuning seeds, goes to ``bench/study.md``. An existing clone is moved to this
project's HEAD and reproduced again, so DVC (and the fine-tuning checkpoints' code
fingerprints) rerun exactly what changed; a run whose json records the provenance it would
have now (:func:`bench.priors.provenance`: code, params, adapters) is not scored again. An
interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.priors import provenance  # noqa: E402


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the study: its ``conf/`` overrides and what to score."""

    name: str
    overrides: tuple[str, ...] = ()
    n_test: int = 0  # first N test prompts scored (0: all)
    steps: tuple[int, ...] = ()  # checkpoints scored (empty: all)
    note: str = ""
    score: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dataset -> shift targets


RUNS = (
    Run("default-s0", ("finetune.seed=0",), note="the default study, fine-tuning seed 0"),
    # seeds 1 and 2 at the middle and the last checkpoint (the study's time on 2 cores)
    Run(
        "default-s1",
        ("finetune.seed=1",),
        steps=(200, 400),
        note="the default study, fine-tuning seed 1",
    ),
    Run(
        "default-s2",
        ("finetune.seed=2",),
        steps=(200, 400),
        note="the default study, fine-tuning seed 2",
    ),
    Run(
        "generated-640",
        (
            "data.generated.n_train=640",
            "finetune.steps=1350",
            "finetune.save_every=450",
            "checkpoints=[0,450,900,1350]",
        ),
        steps=(1350,),
        note="the generated task with 540 training prompts, 15 epochs as the default (the last "
        "checkpoint scored)",
    ),
    Run(
        "winogrande-s",
        (
            "data=winogrande_s",
            "finetune.lr=1e-3",
            "finetune.steps=540",
            "finetune.save_every=270",
            "checkpoints=[0,270,540]",
        ),
        n_test=300,
        steps=(540,),
        note="WinoGrande-S as in the README, the last checkpoint on the first 300 of its 1,267 "
        "dev prompts",
    ),
    Run(
        "obqa-arc_e",
        (
            "data=paper",
            "datasets=[obqa,arc_e]",
            "data.obqa.n_train=300",
            "data.obqa.n_test=300",
            "data.arc_e.n_train=300",
            "data.arc_e.n_test=300",
            "data.arc_c.n_test=300",
            "finetune.steps=200",
            "finetune.save_every=100",
            "checkpoints=[0,100,200]",
        ),
        steps=(200,),
        note="OpenBookQA and ARC-Easy as in the README, OBQA's shift to ARC-C and ARC-E",
        score={"obqa": ("arc_c", "arc_e"), "arc_e": ()},
    ),
    Run(
        "paper-regime",
        (
            "finetune.lr=5e-4",
            "finetune.steps=2400",
            "finetune.save_every=800",
            "checkpoints=[0,800,1600,2400]",
        ),
        note="the generated task at the paper's learning rate, 6 times the steps",
    ),
)


def sh(cmd: list[str], cwd: Path, env: dict) -> None:
    print("+", " ".join(cmd), f"(in {cwd})", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def environment(clone: Path) -> dict:
    """This project's venv on PATH, the clone's sources first on the import path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{clone / 'src'}{os.pathsep}{clone}"
    return env


def composed(run: Run) -> dict:
    from lalora.config import compose

    return compose(ROOT / "conf", list(run.overrides))


def export_targets(run: Run) -> list[str]:
    raw = composed(run)
    return [
        f"export@{m}-{d}-{s}" for m in raw["models"] for d in raw["datasets"]
        for s in raw["checkpoints"]
    ]  # fmt: skip


def train(run: Run, workdir: Path) -> Path:
    """Clone HEAD into ``workdir/<run>`` (or move the clone there) and reproduce the run's
    adapters in it."""
    clone = workdir / run.name
    shared = workdir / "shared"
    if not shared.exists():
        shared.symlink_to((ROOT.parent / "shared").resolve())
    env = environment(clone)
    if not (clone / ".git").exists():
        sh(["git", "clone", "-q", str(ROOT), str(clone)], workdir, env)
        sh([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(ROOT / ".dvc" / "cache")],
           clone, env)  # fmt: skip
    else:  # this project's HEAD; DVC and the checkpoints' fingerprints decide what reruns
        sh(["git", "fetch", "-q", str(ROOT), "HEAD"], clone, env)
        sh(["git", "reset", "-q", "--hard", "FETCH_HEAD"], clone, env)
    # params.yaml composed as `dvc exp run -S ...` would, then the export@ stages reproduced
    (clone / "params.yaml").write_text(yaml.safe_dump(composed(run), sort_keys=False))
    sh([sys.executable, "-m", "dvc", "repro", *export_targets(run)], clone, env)
    return clone


def score(run: Run, clone: Path, out_dir: Path) -> None:
    """bench.priors on every scored dataset of the run (skipped when its json exists)."""
    raw = composed(run)
    for dataset in run.score or {
        d: tuple(raw.get("shift", {}).get(d, ())) for d in raw["datasets"]
    }:
        name = run.name if len(raw["datasets"]) == 1 else f"{run.name}-{dataset}"
        out = out_dir / f"{name}.json"
        if out.exists():
            steps = list(run.steps or raw["checkpoints"])
            root = clone / "models" / raw["models"][0] / dataset
            recorded = json.loads(out.read_text()).get("provenance")
            if recorded == provenance(clone / "params.yaml", root, steps):
                continue
            print(f"{name}: code, params or adapters changed since it was scored; scoring again",
                  file=sys.stderr)  # fmt: skip
        shift = run.score.get(dataset, ()) if run.score else ()
        cmd = [
            sys.executable, "-m", "bench.priors", "--params", str(clone / "params.yaml"),
            "--model", raw["models"][0], "--dataset", dataset,
            "--models-dir", str(clone / "models"), "--data-dir", str(clone / "data"),
            "--n-test", str(run.n_test), "--out", str(out.with_suffix(".md")),
            "--json", str(out), "--note", run.note, *[x for t in shift for x in ("--shift", t)],
            *(["--steps", *map(str, run.steps)] if run.steps else []),
        ]  # fmt: skip
        sh(cmd, ROOT, dict(os.environ))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    default = [r.name for r in RUNS if r.name != "paper-regime"]
    parser.add_argument("--runs", nargs="*", default=default, help="default: all but paper-regime")
    parser.add_argument("--stage", choices=["all", "train", "score", "table"], default="all")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lalora-study"))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "study")
    args = parser.parse_args()
    known = {r.name: r for r in RUNS}
    unknown = [n for n in args.runs if n not in known]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {sorted(known)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for name in args.runs:
        run = known[name]
        if args.stage in ("all", "train"):
            train(run, args.workdir)
        if args.stage in ("all", "score"):
            score(run, args.workdir / run.name, args.out_dir)
        print(f"{name}: done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.stage in ("all", "table"):
        from bench.study_table import write_table

        write_table(args.out_dir, ROOT / "bench" / "study.md")


if __name__ == "__main__":
    main()
