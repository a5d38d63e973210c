"""A commit's DVC experiments side by side, checkpoint by checkpoint.

``dvc exp show --md`` compares experiments at the final checkpoint (``metrics/summary.json``) and
on the fine-tune's cost (``metrics/finetune/``); this module reads, for the baseline commit and
every experiment of it (``dvc exp run``, ``dvc exp run --queue``), the files each experiment
commit holds in git: every checkpoint's metrics (``metrics/checkpoints/``), the fine-tune's wall
time and peak memory (``metrics/finetune/<model>/<dataset>.json``) and the layers the prune
stage removed (``plots/prune/<model>/<dataset>.csv``), and writes one markdown file with two
tables: what each run cost and removed, and ACC / NLL / ECE of the chosen methods at every
checkpoint. An experiment run on some targets only (``dvc exp run evaluate@...``) commits its
baseline's files for the stages it did not run, and those are what it shows for them.
``python -m lalora.experiments --help``; the README's "LoRA+ and layer pruning" table is its
output.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lalora.core.errors import UserError
from lalora.core.io import atomic_write_text
from lalora.core.paths import Layout
from lalora.core.tables import METHOD_NAMES, METRIC_LABELS, markdown_lines
from lalora.scale.remote import dvc

SHOWN = ("acc", "nll", "ece")
UNFINISHED = ("queued", "running", "failed")  # dvc exp show's executor states without results


class ExperimentsError(UserError):
    """No experiment to compare, or an experiment without the files a comparison reads."""


@dataclass(frozen=True)
class Experiment:
    """One row of ``dvc exp show``: its ``name`` (the branch's for the baseline), the commit
    ``rev`` holding its results and its ``params.yaml``."""

    name: str
    rev: str
    params: dict


def listed(shown: list[dict]) -> list[Experiment]:
    """The baseline commits of ``dvc exp show --json`` and their finished experiments: the
    workspace (its results are not committed) and the queued, running or failed experiments
    (their commit is the baseline's snapshot) left out."""
    out = []
    for base in shown:
        done = [g for g in base.get("experiments") or []
                if (g.get("executor") or {}).get("state") not in UNFINISHED]  # fmt: skip
        rows = [base] + [r for g in done for r in g.get("revs", [])]
        for row in rows:
            if row["rev"] == "workspace" or not row.get("data"):
                continue
            params = row["data"].get("params", {}).get("params.yaml", {}).get("data", {})
            out.append(Experiment(row.get("name") or row["rev"][:7], row["rev"], params))
    return out


def param(params: dict, dotted: str):
    """The value at ``dotted`` (``finetune.lora_plus_ratio``) of a params tree, None if absent."""
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _show(project: Path, rev: str, path: Path) -> str | None:
    res = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], cwd=project,
                         capture_output=True, text=True)  # fmt: skip
    return res.stdout if res.returncode == 0 else None


def read(project: Path, exps: list[Experiment], model: str, dataset: str,
         methods: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Per experiment: (``runs``: the fine-tune's usage and the first layer removed, one row
    each; ``scores``: one row per checkpoint and method of ``methods``, ACC / NLL / ECE)."""
    at = Layout(model, dataset)
    runs, scores = [], []
    for e in exps:
        steps = param(e.params, "checkpoints") or []
        found = 0
        for step in steps:
            text = _show(project, e.rev, at.metrics(step))
            if text is None:
                continue
            found += 1
            entry = json.loads(text)
            for method in methods:
                if method in entry and "nll" in entry[method]:
                    scores.append({"experiment": e.name, "step": step, "method": method,
                                   **{m: entry[method][m] for m in SHOWN}})  # fmt: skip
        if not found:
            raise ExperimentsError(f"experiment {e.name} ({e.rev[:8]}) has no metrics of "
                                   f"{model} on {dataset} (checkpoints {steps})")  # fmt: skip
        usage = _show(project, e.rev, at.finetune_usage())
        curve = _show(project, e.rev, at.prune_curve("csv"))
        start = None
        if curve is not None:
            marked = pd.read_csv(io.StringIO(curve))
            marked = marked[marked.removed == 1]
            start = int(marked.layer.iloc[0]) if len(marked) else None
        runs.append({"experiment": e.name, "prune_start": start,
                     **(json.loads(usage) if usage else {})})  # fmt: skip
    return pd.DataFrame(runs), pd.DataFrame(scores)


def _order(value) -> tuple:
    """A sort key for params values of any type: numbers by value, before the rest."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fmt_param(value) -> str:
    """A params value as written: ``1.0`` and ``1`` both read ``1``, ``0.0001875`` in full."""
    if value is None:
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(exps: list[Experiment], keys: list[str], runs: pd.DataFrame, scores: pd.DataFrame,
             methods: tuple[str, ...], model: str, dataset: str) -> str:  # fmt: skip
    """The two tables: per experiment its ``keys`` params, the layers removed, fine-tune wall
    time, seconds per step and peak host memory; per experiment and checkpoint ACC / NLL / ECE
    of every method of ``methods``."""
    by_name = {e.name: e for e in exps}
    head = [
        "experiment",
        *keys,
        "layers removed",
        "fine-tune s",
        "CPU s",
        "s / step",
        "peak host GiB",
    ]
    rows = []
    for r in runs.to_dict("records"):
        n = param(by_name[r["experiment"]].params, "prune.layers") or 0
        start = r.get("prune_start")
        known = start is not None and not pd.isna(start)  # a missing start reads back as NaN
        removed = f"{int(start)}..{int(start) + n - 1}" if n and known else "none"
        rows.append([r["experiment"], *(_fmt_param(param(by_name[r["experiment"]].params, k))
                                        for k in keys), removed,
                     _fmt(r.get("wall_s"), 1), _fmt(r.get("cpu_s"), 1),
                     _fmt(r.get("s_per_step"), 2),
                     _fmt(r.get("peak_host_gb"), 2)])  # fmt: skip
    lines = [f"# {model} on {dataset}: {len(exps)} runs", "", *markdown_lines(head, rows), ""]
    head = ["experiment", "step"] + [
        f"{METHOD_NAMES[m]} {METRIC_LABELS[k]}" for m in methods for k in SHOWN
    ]
    wide = scores.pivot_table(index=["experiment", "step"], columns="method", values=list(SHOWN))
    order = {e.name: i for i, e in enumerate(exps)}
    keys_sorted = sorted(wide.index, key=lambda ix: (order[ix[0]], ix[1]))
    body = [[name, step, *(_fmt(float(wide.loc[(name, step), (k, m)])) for m in methods
                           for k in SHOWN)] for name, step in keys_sorted]  # fmt: skip
    return "\n".join([*lines, *markdown_lines(head, body)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params", nargs="*", default=[], help="dotted params keys to show")
    parser.add_argument("--methods", nargs="+", default=["map", "la", "la_val"])
    parser.add_argument("--names", nargs="*", help="only these experiments (default: all)")
    parser.add_argument("--steps", nargs="*", type=int,
                        help="only these checkpoints (default: every one)")  # fmt: skip
    parser.add_argument("--rev", default="HEAD",
                        help="the baseline commit whose experiments to compare")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHOD_NAMES]
    if unknown:
        raise ExperimentsError(f"unknown method(s) {unknown}; known: {list(METHOD_NAMES)}")
    shown = json.loads(dvc(["exp", "show", "--json", "--rev", args.rev], args.project).stdout)
    exps = listed(shown)
    if args.names:
        missing = set(args.names) - {e.name for e in exps}
        if missing:
            raise ExperimentsError(f"no experiment named {sorted(missing)} of this commit")
        exps = [e for e in exps if e.name in args.names]
    if not exps:
        raise ExperimentsError("no committed baseline or experiment to compare")
    exps.sort(key=lambda e: tuple(_order(param(e.params, k)) for k in args.params))
    runs, scores = read(args.project, exps, args.model, args.dataset, tuple(args.methods))
    if args.steps:
        missing = sorted(set(args.steps) - set(scores.step))
        if missing:
            raise ExperimentsError(f"no experiment has checkpoint(s) {missing}; "
                                   f"they have {sorted(set(scores.step))}")  # fmt: skip
        scores = scores[scores.step.isin(args.steps)]
    text = markdown(exps, args.params, runs, scores, tuple(args.methods), args.model,
                    args.dataset)  # fmt: skip
    atomic_write_text(args.out, text)
    print(text)
