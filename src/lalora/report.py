"""Tables 2-3, the DVC summary metric, plot csv files and the report's figures.

Input: per-checkpoint metric dicts as written by the evaluate stage
(``{"model", "dataset", "step", "map": {acc, nll, ece, n, bins}, "laplace": {...},
"prior_precision", "log_marginal_likelihood"}``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lalora.config import DataConfig
from lalora.io import atomic_write_json, atomic_write_text, share

METRICS = ("acc", "nll", "ece")
METHODS = {"map": "MAP", "laplace": "Laplace"}
LABELS = {"acc": "ACC", "nll": "NLL", "ece": "ECE"}


def dataset_label(key: str, cfg: DataConfig) -> str:
    """The column name of a dataset in the tables: the paper's (WG-S, ARC-C, OBQA, ...)."""
    if cfg.name == "winogrande":
        return "WG-" + cfg.train_split.removeprefix("train_").upper()
    return {"arc_c": "ARC-C", "arc_e": "ARC-E", "obqa": "OBQA", "boolq": "BoolQ"}.get(cfg.name, key)


def long_table(results: list[dict]) -> pd.DataFrame:
    """One row per (model, dataset, step, method) with acc, nll, ece, prior precision, log Z."""
    rows = []
    for r in results:
        for method in METHODS:
            rows.append(
                {
                    "model": r["model"],
                    "dataset": r.get("dataset", ""),
                    "step": r["step"],
                    "method": method,
                    **{m: r[method][m] for m in METRICS},
                    "prior_precision": r.get("prior_precision"),
                    "log_marginal_likelihood": r.get("log_marginal_likelihood"),
                }
            )
    keys = ["model", "dataset", "method", "step"]
    return pd.DataFrame(rows).sort_values(keys).reset_index(drop=True)


def _finals(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each (model, dataset)'s final checkpoint."""
    last = df.groupby(["model", "dataset"]).step.transform("max")
    return df[df.step == last]


def results_table(
    df: pd.DataFrame, method: str, models: list[str], labels: dict[str, str]
) -> pd.DataFrame:
    """The report's table layout at each final checkpoint: rows (model, metric), one column per
    dataset (``labels`` maps dataset keys to column names, in column order)."""
    final = _finals(df[df.method == method])
    rows = []
    for model in models:
        for m in METRICS:
            row: dict = {"LLM": model, "Metric": LABELS[m]}
            for key, label in labels.items():
                cell = final[(final.model == model) & (final.dataset == key)][m]
                row[label] = round(float(cell.iloc[0]), 4)
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table."""
    head = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def summary(df: pd.DataFrame) -> dict:
    """``{model: {dataset: {map: {acc, nll, ece}, laplace: {...}, step, prior_precision,
    log_marginal_likelihood}}}`` at the final checkpoints: the file ``dvc metrics diff`` reads."""
    out: dict = {}
    for (model, dataset), last in _finals(df).groupby(["model", "dataset"]):
        entry: dict = {"step": int(last.step.iloc[0])}
        for method in METHODS:
            row = last[last.method == method].iloc[0]
            entry[method] = {m: float(row[m]) for m in METRICS}
        entry["prior_precision"] = float(last.prior_precision.iloc[0])
        entry["log_marginal_likelihood"] = float(last.log_marginal_likelihood.iloc[0])
        out.setdefault(str(model), {})[str(dataset)] = entry
    return out


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """Long table for ``dvc plots`` (template ``series``): step, series ("<model> <dataset>
    <Method>"), acc, nll, ece."""
    out = df[["step", *METRICS]].copy()
    out.insert(1, "series", df.model + " " + df.dataset + " " + df.method.map(METHODS))
    return out


def figure1(df: pd.DataFrame, path: Path) -> None:
    """ACC, NLL and ECE against gradient steps, one row of panels per dataset; one colour per
    model, MAP solid, Laplace dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(df.dataset))
    fig, axes = plt.subplots(len(datasets), 3, figsize=(13, 3.8 * len(datasets)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(df.model))
    for row, dataset in zip(axes, datasets, strict=True):
        for i, model in enumerate(models):
            group = df[(df.model == model) & (df.dataset == dataset)]
            for method, style in (("map", "-"), ("laplace", "--")):
                g = group[group.method == method].sort_values("step")
                for ax, m in zip(row, METRICS, strict=True):
                    ax.plot(
                        g.step,
                        g[m],
                        style,
                        marker="o",
                        color=colours[i % len(colours)],
                        label=f"{model} {METHODS[method]}",
                    )
        for ax, m in zip(row, METRICS, strict=True):
            ax.set_xlabel("gradient steps")
            ax.set_ylabel(f"{LABELS[m]} ({dataset})")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def reliability_figure(results: list[dict], path: Path) -> None:
    """Reliability diagrams at each (model, dataset)'s final checkpoint, MAP against Laplace:
    one row per model, one column per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals: dict[tuple[str, str], dict] = {}
    for r in results:
        key = (r["model"], r.get("dataset", ""))
        if key not in finals or r["step"] > finals[key]["step"]:
            finals[key] = r
    models = list(dict.fromkeys(k[0] for k in finals))
    datasets = list(dict.fromkeys(k[1] for k in finals))
    fig, axes = plt.subplots(
        len(models), len(datasets), figsize=(4.2 * len(datasets), 4 * len(models)), squeeze=False
    )
    for (model, dataset), r in finals.items():
        ax = axes[models.index(model)][datasets.index(dataset)]
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
        ax.set_title(f"{model}, {dataset}, step {r['step']}")
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
    share(tmp)
    os.replace(tmp, path)


def write_all(
    results: list[dict],
    models: list[str],
    labels: dict[str, str],
    metrics_dir: Path,
    plots_dir: Path,
) -> None:
    """Every aggregate output, each written atomically; ``labels`` maps the dataset keys of the
    results to table column names."""
    df = long_table(results)
    for name, method in (("table2", "map"), ("table3", "laplace")):
        t = results_table(df, method, models, labels)
        atomic_write_text(metrics_dir / f"{name}.csv", t.to_csv(index=False))
        atomic_write_text(metrics_dir / f"{name}.md", markdown(t))
    atomic_write_json(metrics_dir / "summary.json", summary(df))
    atomic_write_text(plots_dir / "metrics.csv", df.to_csv(index=False))
    atomic_write_text(plots_dir / "curves.csv", curves(df).to_csv(index=False))
    figure1(df, plots_dir / "figure1.png")
    reliability_figure(results, plots_dir / "reliability.png")
