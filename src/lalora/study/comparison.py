"""The methods comparison (the Laplace-LoRA paper's Table 1 layout) from saved predictions.

Input: per (model, dataset, step) the per-example predictive probabilities of each method, as
:func:`lalora.core.io.save_predictions` writes them. At each (model, dataset)'s final checkpoint
every method gets ACC, NLL, ECE and Brier with 95% bootstrap intervals
(:func:`lalora.core.metrics.bootstrap_intervals`); the checkpoint ensemble averages the MAP
predictions of the last K checkpoints, the deep ensemble the final MAP predictions of the study's
run and of its extra seeds; every member must score the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from lalora.core.metrics import bootstrap_intervals, score
from lalora.core.tables import METHOD_NAMES, METRIC_LABELS, METRICS, markdown_lines
from lalora.models.baselines import checkpoint_ensemble


@dataclass(frozen=True)
class Predictions:
    """One checkpoint's saved predictions: ``probs[method]`` (N, C), ``labels`` (N,), ids."""

    probs: dict[str, Tensor]
    labels: Tensor
    ids: list[str]


def _same_examples(members: list[Predictions], final: Predictions, what: str) -> list[Tensor]:
    for p in members:
        if p.ids != final.ids:
            raise ValueError(
                f"{what}: the members score different examples; an ensemble needs the same "
                "test split in every member"
            )
    return [p.probs["map"] for p in members]


@dataclass(frozen=True)
class Final:
    """One (model, dataset)'s final checkpoint: its step, labels (N,) and the predictive
    probabilities (N, C) of every method, in :data:`METHOD_NAMES`' order (the checkpoint and
    deep ensembles included when configured)."""

    step: int
    labels: Tensor
    probs: dict[str, Tensor]


def finals(
    preds: dict[tuple[str, str, int], Predictions],
    ensemble_last: int,
    members: dict[tuple[str, str], list[Predictions]] | None = None,
) -> dict[tuple[str, str], Final]:
    """Every method at each (model, dataset)'s final checkpoint: the saved ones, the checkpoint
    ensemble of the last ``ensemble_last`` checkpoints' MAP predictions (when > 0) and the deep
    ensemble of the final MAP and ``members[(model, dataset)]``' (when given)."""
    out = {}
    for model, dataset in dict.fromkeys((m, d) for m, d, _ in preds):
        steps = sorted(s for m, d, s in preds if (m, d) == (model, dataset))
        final = preds[(model, dataset, steps[-1])]
        methods = {k: v for k, v in final.probs.items() if k in METHOD_NAMES}
        if ensemble_last > 0:
            ckpts = [preds[(model, dataset, s)] for s in steps[-ensemble_last:]]
            what = f"{model} {dataset} checkpoint ensemble"
            methods["ensemble"] = checkpoint_ensemble(_same_examples(ckpts, final, what))
        runs = (members or {}).get((model, dataset), [])
        if runs:
            what = f"{model} {dataset} deep ensemble"
            methods["deep_ensemble"] = checkpoint_ensemble(
                _same_examples([final, *runs], final, what)
            )
        ordered = {m: methods[m] for m in METHOD_NAMES if m in methods}
        out[(model, dataset)] = Final(steps[-1], final.labels, ordered)
    return out


def compare(
    preds: dict[tuple[str, str, int], Predictions],
    ensemble_last: int,
    n_bins: int = 10,
    resamples: int = 1000,
    seed: int = 0,
    members: dict[tuple[str, str], list[Predictions]] | None = None,
) -> pd.DataFrame:
    """Long table: model, dataset, method, key, metric, value, low, high (the 95% interval),
    step, at each (model, dataset)'s final checkpoint, one row per method of :func:`finals`
    and metric (``method``: the display name, ``key``: the method's key, e.g. ``la_val``)."""
    rows = []
    for (model, dataset), final in finals(preds, ensemble_last, members).items():
        for method, probs in final.probs.items():
            point = score(probs, final.labels, n_bins)
            ci = bootstrap_intervals(probs, final.labels, n_bins, resamples, seed=seed)
            for metric in METRICS:
                rows.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "method": METHOD_NAMES[method],
                        "key": method,
                        "metric": METRIC_LABELS[metric],
                        "value": getattr(point, metric),
                        "low": ci[metric].low,
                        "high": ci[metric].high,
                        "step": final.step,
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
        rows = []
        for method, m in g.groupby("method", sort=False):
            v = {r.metric: r for r in m.itertuples()}
            rows.append([method, f"{v['ACC'].value:.3f}", _ci(v["NLL"]), _ci(v["ECE"]),
                         f"{v['Brier'].value:.3f}"])  # fmt: skip
        out += markdown_lines(["method", "ACC", "NLL [95% CI]", "ECE [95% CI]", "Brier"], rows)
        out.append("")
    return "\n".join(out)


def _ci(row) -> str:
    return f"{row.value:.3f} [{row.low:.3f}, {row.high:.3f}]"


def shift_table(results: dict[tuple[str, str], dict], labels: dict[str, str]) -> pd.DataFrame:
    """Long table of the shift stage's results ``{(model, trained on): {test set: {method:
    scores}}}``: model, train, test, method, ACC, NLL, ECE, Brier."""
    rows = []
    for (model, source), targets in results.items():
        for target, scores in targets.items():
            for method, name in METHOD_NAMES.items():
                if method in scores:
                    s = scores[method]
                    rows.append(
                        {
                            "model": model,
                            "train": labels.get(source, source),
                            "test": labels.get(target, target),
                            "method": name,
                            **{METRIC_LABELS[m]: s[m] for m in METRICS},
                        }
                    )
    return pd.DataFrame(
        rows, columns=["model", "train", "test", "method", "ACC", "NLL", "ECE", "Brier"]
    )


def shift_markdown(df: pd.DataFrame) -> str:
    """One table per (model, train -> test) with a row per method."""
    if df.empty:
        return "No distribution shift configured (`shift` in params.yaml).\n"
    out = []
    for (model, train, test), g in df.groupby(["model", "train", "test"], sort=False):
        out += [f"### {model}: fine-tuned on {train}, tested on {test}", ""]
        rows = [
            [r.method, *(f"{v:.3f}" for v in (r.ACC, r.NLL, r.ECE, r.Brier))]
            for r in g.itertuples()
        ]
        out += markdown_lines(["method", "ACC", "NLL", "ECE", "Brier"], rows)
        out.append("")
    return "\n".join(out)
