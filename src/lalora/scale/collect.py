"""Gather a grid's experiments and write its tables and plot.

:func:`pull` fetches the cells' experiments of the current commit from the git remote
(``dvc exp pull``; their outputs stay on the DVC remote unless asked for: ``dvc exp apply``
and ``dvc pull`` restore one). :func:`read_cells` reads each cell's ``metrics/summary.json``
(every method at the final checkpoint) from its experiment commit, and :func:`write_grid`
writes into ``out``: ``cells.csv`` (one row per cell and method), ``grid.md`` (per model,
dataset and method: the mean and standard deviation over seeds) and ``grid.png``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd

from lalora.core.io import atomic_write_text
from lalora.core.tables import METHOD_NAMES, METRIC_LABELS, METRICS, markdown_lines
from lalora.scale.grid import Cell, Grid
from lalora.scale.remote import RemoteError, dvc

SUMMARY = "metrics/summary.json"


def pull(project: Path, names: list[str], git_remote: str = "origin",
         cache: bool = False) -> None:  # fmt: skip
    """``dvc exp pull`` the named experiments (with their outputs when ``cache``)."""
    if names:
        dvc(["exp", "pull", "--force", *([] if cache else ["--no-cache"]), git_remote, *names],
            project)  # fmt: skip


def _experiment_commit(project: Path, head: str, name: str) -> str | None:
    """The commit of experiment ``name`` of the baseline ``head``, None if absent."""
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
    res = subprocess.run(["git", "rev-parse", "--verify", "--quiet", ref], cwd=project,
                         capture_output=True, text=True)  # fmt: skip
    return res.stdout.strip() or None


def read_cells(project: Path, cells: list[Cell]) -> pd.DataFrame:
    """One row per cell and method: model, dataset, seed, step, method and the metrics; a cell
    without an experiment of this commit is left out (and named)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    rows, missing = [], []
    for cell in cells:
        commit = _experiment_commit(project, head, cell.name)
        if commit is None:
            missing.append(cell.name)
            continue
        text = subprocess.run(["git", "show", f"{commit}:{SUMMARY}"], cwd=project,
                              capture_output=True, text=True)  # fmt: skip
        if text.returncode != 0:
            raise RemoteError(f"experiment {cell.name} ({commit[:8]}) has no {SUMMARY}")
        rows.extend(summary_rows(json.loads(text.stdout), cell))
    if missing:
        print(f"collect: no experiment yet for {len(missing)} cell(s): {', '.join(missing)}")
    return pd.DataFrame(rows)


def summary_rows(summary: dict, cell: Cell) -> list[dict]:
    """The rows of ``cell`` in a study's ``metrics/summary.json`` (its final checkpoint): one
    per method, with model, dataset, seed, step and the metrics."""
    entry = summary[cell.model][cell.dataset]
    return [
        {"model": cell.model, "dataset": cell.dataset, "seed": cell.seed, "step": entry["step"],
         "method": method, **{m: values[m] for m in METRICS if m in values}}
        for method, values in entry.items()
        if isinstance(values, dict) and "nll" in values
    ]  # fmt: skip


def summarise(cells: pd.DataFrame) -> pd.DataFrame:
    """Per model, dataset and method: seeds, and each metric's mean and standard deviation
    over them (sample sd; 0 for one seed)."""
    keys = ["model", "dataset", "method"]
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    g = cells.groupby(keys, sort=False)
    out = g.agg(seeds=("seed", "nunique"), step=("step", "max"),
                **{f"{m}_mean": (m, "mean") for m in METRICS},
                **{f"{m}_sd": (m, lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0)
                   for m in METRICS}).reset_index()  # fmt: skip
    out["_order"] = out["method"].map(lambda m: order.get(m, len(order)))
    return out.sort_values(["model", "dataset", "_order"]).drop(columns="_order")


def markdown(grid: Grid, summary: pd.DataFrame) -> str:
    """``grid.md``: mean ± sd over seeds of ACC, NLL and ECE per model, dataset and method."""
    shown = ("acc", "nll", "ece")
    head = ["model", "dataset", "method", "seeds", "step", *(METRIC_LABELS[m] for m in shown)]
    rows = [[r.model, r.dataset, METHOD_NAMES.get(r.method, r.method), r.seeds, r.step,
             *(f"{getattr(r, m + '_mean'):.3f} ± {getattr(r, m + '_sd'):.3f}" for m in shown)]
            for r in summary.itertuples()]  # fmt: skip
    title = f"# Grid {grid.name}: {grid.shape()} (mean ± sd over seeds, final checkpoint)"
    return "\n".join([title, "", *markdown_lines(head, rows)]) + "\n"


def plot(summary: pd.DataFrame, path: Path) -> None:
    """NLL and ECE (mean, sd as error bars) per method, one column per dataset, a bar per
    model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, models = list(dict.fromkeys(summary.dataset)), list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(2, len(datasets), figsize=(4 + 3 * len(datasets), 6), squeeze=False)
    width = 0.8 / len(models)
    for j, d in enumerate(datasets):
        for i, metric in enumerate(("nll", "ece")):
            ax = axes[i][j]
            part = summary[summary.dataset == d]
            methods = list(dict.fromkeys(part.method))
            for k, m in enumerate(models):
                rows = part[part.model == m].set_index("method").reindex(methods)
                ax.bar([x + k * width for x in range(len(methods))], rows[f"{metric}_mean"],
                       width, yerr=rows[f"{metric}_sd"], label=m, capsize=2)  # fmt: skip
            ax.set_xticks(
                [x + width * (len(models) - 1) / 2 for x in range(len(methods))],
                [METHOD_NAMES.get(m, m) for m in methods],
                rotation=45,
                ha="right",
            )
            ax.set_ylabel(METRIC_LABELS[metric])
            if i == 0:
                ax.set_title(d)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_grid(grid: Grid, cells: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Write ``cells.csv``, ``grid.md`` and ``grid.png`` into ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    if cells.empty:
        raise RemoteError(f"grid {grid.name}: no cell has landed yet; nothing to collect")
    summary = summarise(cells)
    atomic_write_text(out / "cells.csv", cells.to_csv(index=False))
    atomic_write_text(out / "grid.md", markdown(grid, summary))
    plot(summary, out / "grid.png")
    return summary
