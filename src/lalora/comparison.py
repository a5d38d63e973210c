"""The methods comparison (the Laplace-LoRA paper's Table 1 layout) from saved predictions.

Input: per (model, dataset, step) the per-example predictive probabilities of each method, as
:func:`lalora.io.save_predictions` writes them. At each (model, dataset)'s final checkpoint every
method gets ACC, NLL, ECE and Brier with 95% bootstrap intervals
(:func:`lalora.metrics.bootstrap_intervals`); the checkpoint ensemble averages the MAP
predictions of the last K checkpoints, which must score the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from lalora.baselines import checkpoint_ensemble
from lalora.metrics import bootstrap_intervals, score

METHOD_NAMES = {
    "map": "MAP",
    "la": "LA",
    "la_val": "LA (val)",
    "llla": "LLLA",
    "temperature": "Temperature scaling",
    "mc_dropout": "MC dropout",
    "ensemble": "Checkpoint ensemble",
}
METRICS = ("acc", "nll", "ece", "brier")


@dataclass(frozen=True)
class Predictions:
    """One checkpoint's saved predictions: ``probs[method]`` (N, C), ``labels`` (N,), ids."""

    probs: dict[str, Tensor]
    labels: Tensor
    ids: list[str]


def compare(
    preds: dict[tuple[str, str, int], Predictions],
    ensemble_last: int,
    n_bins: int = 10,
    resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Long table: model, dataset, method, metric, value, low, high (the 95% interval), at each
    (model, dataset)'s final checkpoint, one row per method of :data:`METHOD_NAMES` present."""
    rows = []
    for model, dataset in dict.fromkeys((m, d) for m, d, _ in preds):
        steps = sorted(s for m, d, s in preds if (m, d) == (model, dataset))
        final = preds[(model, dataset, steps[-1])]
        methods = {k: v for k, v in final.probs.items() if k in METHOD_NAMES}
        if ensemble_last > 0:
            members = [preds[(model, dataset, s)] for s in steps[-ensemble_last:]]
            for p in members:
                if p.ids != final.ids:
                    raise ValueError(
                        f"{model} {dataset}: checkpoints score different examples; the "
                        "checkpoint ensemble needs the same test split at every step"
                    )
            methods["ensemble"] = checkpoint_ensemble([p.probs["map"] for p in members])
        for method in METHOD_NAMES:
            if method not in methods:
                continue
            probs = methods[method]
            point = score(probs, final.labels, n_bins)
            ci = bootstrap_intervals(probs, final.labels, n_bins, resamples, seed=seed)
            for metric in METRICS:
                rows.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "method": METHOD_NAMES[method],
                        "metric": metric.upper() if metric != "brier" else "Brier",
                        "value": getattr(point, metric),
                        "low": ci[metric].low,
                        "high": ci[metric].high,
                        "step": steps[-1],
                    }
                )
    return pd.DataFrame(rows)


def comparison_markdown(df: pd.DataFrame, labels: dict[str, str]) -> str:
    """Per model and dataset, a table with one row per method: ACC, NLL [95% CI], ECE [95% CI],
    Brier."""
    out = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        step = int(g.step.iloc[0])
        out += [f"### {model}, {labels.get(dataset, dataset)} (step {step})", ""]
        out += ["| method | ACC | NLL [95% CI] | ECE [95% CI] | Brier |", "|---|---|---|---|---|"]
        for method, m in g.groupby("method", sort=False):
            v = {r.metric: r for r in m.itertuples()}
            out.append(
                f"| {method} | {v['ACC'].value:.3f} | {_ci(v['NLL'])} | {_ci(v['ECE'])} "
                f"| {v['Brier'].value:.3f} |"
            )
        out.append("")
    return "\n".join(out)


def _ci(row) -> str:
    return f"{row.value:.3f} [{row.low:.3f}, {row.high:.3f}]"
