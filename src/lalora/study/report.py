"""Tables 2-3, the DVC summary metric and plots, and the report's figures.

Inputs: per-checkpoint metric dicts as the evaluate stage writes them (``{"model", "dataset",
"step", "methods": [keys], <key>: {acc, nll, ece, brier, n, bins}, "laplace_method": "la" |
"la_val", "prior_precision", "log_marginal_likelihood"}``), the methods comparison at the final
checkpoints (:func:`lalora.study.comparison.compare`), its reliability bins and the shift stage's
results.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lalora.config import DataConfig
from lalora.core.io import atomic_write_json, atomic_write_text, save_figure
from lalora.core.metrics import score
from lalora.core.tables import METHOD_NAMES, METRIC_LABELS, METRICS, markdown_lines
from lalora.study.comparison import Final

TABLE_METRICS = ("acc", "nll", "ece")  # the report's Tables 2-3


def dataset_label(key: str, cfg: DataConfig) -> str:
    """The column name of a dataset in the tables: the paper's (WG-S, ARC-C, OBQA, ...)."""
    if cfg.name == "winogrande":
        return "WG-" + cfg.train_split.removeprefix("train_").upper()
    return {"arc_c": "ARC-C", "arc_e": "ARC-E", "obqa": "OBQA", "boolq": "BoolQ"}.get(cfg.name, key)


def long_table(results: list[dict]) -> pd.DataFrame:
    """One row per (model, dataset, step, method) for every method a checkpoint scored: acc,
    nll, ece, brier, whether it is the configured Laplace posterior (``laplace``), prior
    precision and log Z of the configured prior."""
    rows = []
    for r in results:
        for method in r["methods"]:
            rows.append(
                {
                    "model": r["model"],
                    "dataset": r.get("dataset", ""),
                    "step": r["step"],
                    "method": method,
                    **{m: r[method][m] for m in METRICS},
                    "laplace": method == r["laplace_method"],
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


def _pick(df: pd.DataFrame, method: str) -> pd.DataFrame:
    """The rows of ``method``; ``laplace``: of the configured Laplace posterior."""
    return df[df.laplace] if method == "laplace" else df[df.method == method]


def results_table(
    df: pd.DataFrame, method: str, models: list[str], labels: dict[str, str]
) -> pd.DataFrame:
    """The report's table layout at each final checkpoint: rows (model, metric), one column per
    dataset (``labels`` maps dataset keys to column names, in column order); ``method`` a
    method key or ``laplace`` (the configured posterior)."""
    final = _finals(_pick(df, method))
    rows = []
    for model in models:
        for m in TABLE_METRICS:
            row: dict = {"LLM": model, "Metric": METRIC_LABELS[m]}
            for key, label in labels.items():
                cell = final[(final.model == model) & (final.dataset == key)][m]
                row[label] = round(float(cell.iloc[0]), 4)
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df``'s columns and rows."""
    return "\n".join(markdown_lines(df.columns, df.itertuples(index=False))) + "\n"


def summary(df: pd.DataFrame, comparison: pd.DataFrame, shifted: dict | None = None) -> dict:
    """The file ``dvc metrics`` and ``dvc exp show`` read, at each final checkpoint::

        {model: {dataset: {"step", "prior_precision", "log_marginal_likelihood",
                           <method key>: {acc, nll, ece, brier, nll_lo, nll_hi, ece_lo, ece_hi},
                           "shift": {target: {<method key>: {acc, nll, ece, brier}}}}}}

    with a key per method of ``comparison`` (its values; ``_lo``/``_hi``: the 95% bootstrap
    interval) and, when ``shifted[(model, dataset)]`` lists targets, the shift stage's scores.
    ``prior_precision`` and ``log_marginal_likelihood`` are the configured prior's."""
    out: dict = {}
    conf = _finals(df[df.laplace])
    for (model, dataset), g in comparison.groupby(["model", "dataset"], sort=False):
        entry: dict = {"step": int(g.step.iloc[0])}
        row = conf[(conf.model == model) & (conf.dataset == dataset)].iloc[0]
        entry["prior_precision"] = float(row.prior_precision)
        entry["log_marginal_likelihood"] = float(row.log_marginal_likelihood)
        for key, m in g.groupby("key", sort=False):
            v = {r.metric.lower(): r for r in m.itertuples()}
            entry[key] = {k: float(v[k].value) for k in METRICS}
            for k in ("nll", "ece"):
                entry[key] |= {f"{k}_lo": float(v[k].low), f"{k}_hi": float(v[k].high)}
        targets = (shifted or {}).get((model, dataset), {})
        if targets:
            entry["shift"] = {
                t: {k: {m: float(s[k][m]) for m in METRICS} for k in METHOD_NAMES if k in s}
                for t, s in targets.items()
            }
        out.setdefault(str(model), {})[str(dataset)] = entry
    return out


def series_name(model: str, dataset: str, method: str) -> str:
    """The ``series`` of DVC's plots: "<model> <dataset> <method's display name>"."""
    return f"{model} {dataset} {METHOD_NAMES[method]}"


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """Long table for ``dvc plots`` (template ``series``): step, series (one per model, dataset
    and method scored at every checkpoint), acc, nll, ece, brier."""
    keep = df[df.method.isin(list(METHOD_NAMES))]
    out = keep[["step", *METRICS]].copy()
    names = [series_name(r.model, r.dataset, r.method) for r in keep.itertuples()]
    out.insert(1, "series", names)
    return out.reset_index(drop=True)


def reliability_table(finals: dict[tuple[str, str], Final], n_bins: int) -> pd.DataFrame:
    """Reliability bins of every method at each final checkpoint, for ``dvc plots`` (template
    ``reliability``): series, model, dataset, method (key), bin, confidence, accuracy, count;
    the non-empty bins only."""
    rows = []
    for (model, dataset), final in finals.items():
        for method, probs in final.probs.items():
            bins = score(probs, final.labels, n_bins).bins
            for b, (c, a, n) in enumerate(
                zip(bins.confidence, bins.accuracy, bins.count, strict=True)
            ):
                if n > 0:
                    rows.append(
                        {
                            "series": series_name(model, dataset, method),
                            "model": model,
                            "dataset": dataset,
                            "method": method,
                            "bin": b,
                            "confidence": c,
                            "accuracy": a,
                            "count": n,
                        }
                    )
    columns = ["series", "model", "dataset", "method", "bin", "confidence", "accuracy", "count"]
    return pd.DataFrame(rows, columns=columns)


def figure1(df: pd.DataFrame, path: Path) -> None:
    """ACC, NLL and ECE against gradient steps, one row of panels per dataset; one colour per
    model, MAP solid, the configured Laplace posterior dashed."""
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
            for method, style, name in (("map", "-", "MAP"), ("laplace", "--", "Laplace")):
                g = _pick(group, method).sort_values("step")
                for ax, m in zip(row, TABLE_METRICS, strict=True):
                    ax.plot(
                        g.step,
                        g[m],
                        style,
                        marker="o",
                        color=colours[i % len(colours)],
                        label=f"{model} {name}",
                    )
        for ax, m in zip(row, TABLE_METRICS, strict=True):
            ax.set_xlabel("gradient steps")
            ax.set_ylabel(f"{METRIC_LABELS[m]} ({dataset})")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def reliability_figure(df: pd.DataFrame, bins: pd.DataFrame, path: Path) -> None:
    """Reliability diagrams at each (model, dataset)'s final checkpoint, MAP against the
    configured Laplace posterior: one row per model, one column per dataset. ``bins``:
    :func:`reliability_table`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = _finals(df)
    models = list(dict.fromkeys(final.model))
    datasets = list(dict.fromkeys(final.dataset))
    fig, axes = plt.subplots(
        len(models), len(datasets), figsize=(4.2 * len(datasets), 4 * len(models)), squeeze=False
    )
    for (model, dataset), g in final.groupby(["model", "dataset"], sort=False):
        ax = axes[models.index(model)][datasets.index(dataset)]
        ax.plot([0, 1], [0, 1], ":", color="grey")
        laplace = g[g.laplace].iloc[0]
        for method, marker, name in (("map", "o", "MAP"), (laplace.method, "s", "Laplace")):
            row = g[g.method == method].iloc[0]
            b = bins[(bins.model == model) & (bins.dataset == dataset) & (bins.method == method)]
            ax.plot(b.confidence, b.accuracy, marker=marker, label=f"{name} (ECE {row.ece:.3f})")
        ax.set_title(f"{model}, {dataset}, step {int(g.step.iloc[0])}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_all(
    results: list[dict],
    models: list[str],
    labels: dict[str, str],
    metrics_dir: Path,
    plots_dir: Path,
    comparison: pd.DataFrame,
    bins: pd.DataFrame,
    shifted: dict | None = None,
) -> None:
    """Every aggregate output but the comparison and shift tables, each written atomically:
    Tables 2-3, ``summary.json``, the plot csv files and the figures. ``labels`` maps the
    dataset keys of the results to table column names; ``comparison``:
    :func:`lalora.study.comparison.compare` on the same run; ``bins``: :func:`reliability_table`."""
    df = long_table(results)
    for name, method in (("table2", "map"), ("table3", "laplace")):
        t = results_table(df, method, models, labels)
        atomic_write_text(metrics_dir / f"{name}.csv", t.to_csv(index=False))
        atomic_write_text(metrics_dir / f"{name}.md", markdown(t))
    atomic_write_json(metrics_dir / "summary.json", summary(df, comparison, shifted))
    atomic_write_text(plots_dir / "metrics.csv", df.to_csv(index=False))
    atomic_write_text(plots_dir / "curves.csv", curves(df).to_csv(index=False))
    atomic_write_text(plots_dir / "reliability.csv", bins.to_csv(index=False))
    figure1(df, plots_dir / "figure1.png")
    reliability_figure(df, bins, plots_dir / "reliability.png")
