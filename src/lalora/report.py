"""Tables 2-3, the DVC summary metric, plot csv files and the report's figures.

Input: per-checkpoint metric dicts as written by the evaluate stage
(``{"model", "step", "map": {acc, nll, ece, n, bins}, "laplace": {...}, "prior_precision",
"log_marginal_likelihood"}``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lalora.io import atomic_write_json, atomic_write_text

METRICS = ("acc", "nll", "ece")
METHODS = {"map": "MAP", "laplace": "Laplace"}
LABELS = {"acc": "ACC", "nll": "NLL", "ece": "ECE"}


def long_table(results: list[dict]) -> pd.DataFrame:
    """One row per (model, step, method) with acc, nll, ece, prior precision, log Z."""
    rows = []
    for r in results:
        for method in METHODS:
            rows.append(
                {
                    "model": r["model"],
                    "step": r["step"],
                    "method": method,
                    **{m: r[method][m] for m in METRICS},
                    "prior_precision": r.get("prior_precision"),
                    "log_marginal_likelihood": r.get("log_marginal_likelihood"),
                }
            )
    return pd.DataFrame(rows).sort_values(["model", "method", "step"]).reset_index(drop=True)


def results_table(df: pd.DataFrame, method: str, models: list[str], dataset: str) -> pd.DataFrame:
    """The report's table layout at each model's final checkpoint: rows (model, metric)."""
    final = df[df.method == method].sort_values("step").groupby("model").tail(1)
    rows = []
    for model in models:
        row = final[final.model == model]
        for m in METRICS:
            rows.append(
                {"LLM": model, "Metric": LABELS[m], dataset: round(float(row[m].iloc[0]), 4)}
            )
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table."""
    head = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def summary(df: pd.DataFrame) -> dict:
    """``{model: {map: {acc, nll, ece}, laplace: {...}, step, prior_precision, log_z}}`` at the
    final checkpoint: the file ``dvc metrics diff`` reads."""
    out: dict = {}
    for model, group in df.groupby("model"):
        last = group[group.step == group.step.max()]
        entry: dict = {"step": int(last.step.iloc[0])}
        for method in METHODS:
            row = last[last.method == method].iloc[0]
            entry[method] = {m: float(row[m]) for m in METRICS}
        entry["prior_precision"] = float(last.prior_precision.iloc[0])
        entry["log_marginal_likelihood"] = float(last.log_marginal_likelihood.iloc[0])
        out[str(model)] = entry
    return out


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """Long table for ``dvc plots`` (template ``series``): step, series ("<model> <Method>"),
    acc, nll, ece."""
    out = df[["step", *METRICS]].copy()
    out.insert(1, "series", df.model + " " + df.method.map(METHODS))
    return out


def figure1(df: pd.DataFrame, path: Path) -> None:
    """ACC, NLL and ECE against gradient steps; one colour per model, MAP solid, Laplace dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, group) in enumerate(df.groupby("model")):
        for method, style in (("map", "-"), ("laplace", "--")):
            g = group[group.method == method].sort_values("step")
            for ax, m in zip(axes, METRICS, strict=True):
                ax.plot(
                    g.step,
                    g[m],
                    style,
                    marker="o",
                    color=colours[i % len(colours)],
                    label=f"{model} {METHODS[method]}",
                )
    for ax, m in zip(axes, METRICS, strict=True):
        ax.set_xlabel("gradient steps")
        ax.set_ylabel(LABELS[m])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def reliability_figure(results: list[dict], path: Path) -> None:
    """Reliability diagrams at each model's final checkpoint, MAP against Laplace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals: dict[str, dict] = {}
    for r in results:
        if r["model"] not in finals or r["step"] > finals[r["model"]]["step"]:
            finals[r["model"]] = r
    fig, axes = plt.subplots(1, len(finals), figsize=(4.2 * len(finals), 4), squeeze=False)
    for ax, (model, r) in zip(axes[0], sorted(finals.items()), strict=True):
        ax.plot([0, 1], [0, 1], ":", color="grey")
        for method, marker in (("map", "o"), ("laplace", "s")):
            bins = r[method]["bins"]
            pts = [
                (c, a)
                for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"], strict=True)
                if n > 0
            ]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                label=f"{METHODS[method]} (ECE {r[method]['ece']:.3f})",
            )
        ax.set_title(f"{model}, step {r['step']}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import os
    import tempfile

    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_all(
    results: list[dict], models: list[str], dataset: str, metrics_dir: Path, plots_dir: Path
) -> None:
    """Every aggregate output, each written atomically."""
    df = long_table(results)
    for name, method in (("table2", "map"), ("table3", "laplace")):
        t = results_table(df, method, models, dataset)
        atomic_write_text(metrics_dir / f"{name}.csv", t.to_csv(index=False))
        atomic_write_text(metrics_dir / f"{name}.md", markdown(t))
    atomic_write_json(metrics_dir / "summary.json", summary(df))
    atomic_write_text(plots_dir / "metrics.csv", df.to_csv(index=False))
    atomic_write_text(plots_dir / "curves.csv", curves(df).to_csv(index=False))
    figure1(df, plots_dir / "figure1.png")
    reliability_figure(results, plots_dir / "reliability.png")
