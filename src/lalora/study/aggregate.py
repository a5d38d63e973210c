"""The study's tables, metrics and plots from every checkpoint's saved results.

:func:`read_study` reads, through :class:`lalora.core.paths.Layout`, what the evaluate, members and
shift stages wrote for every model x dataset (x checkpoint); :func:`write_study` writes the
methods comparison (:mod:`lalora.study.comparison`), the shift table, Tables 2-3, the summary
metric, the plot csv files and the figures (:mod:`lalora.study.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lalora.config import Params
from lalora.core.io import atomic_write_text, load_predictions, read_json
from lalora.core.metrics import check_finite
from lalora.core.paths import Layout
from lalora.study.comparison import (
    Predictions,
    compare,
    comparison_markdown,
    finals,
    shift_markdown,
    shift_table,
)
from lalora.study.report import dataset_label, reliability_table, write_all


@dataclass(frozen=True)
class Study:
    """Everything the stages before ``aggregate`` wrote: the per-checkpoint metric records
    (each with its ``dataset``), the saved predictions per (model, dataset, step), the deep
    ensemble members' per (model, dataset) and the shift results per (model, dataset)."""

    results: list[dict]
    preds: dict[tuple[str, str, int], Predictions]
    members: dict[tuple[str, str], list[Predictions]]
    shifted: dict[tuple[str, str], dict]


def _checkpoint(layout: Layout, step: int) -> tuple[dict, Predictions]:
    stage = f"evaluate@{layout.model}-{layout.dataset}-{step}"
    path = layout.metrics(step)
    result = read_json(path, stage)
    check_finite(result, str(path))
    probs = load_predictions(layout.predictions(step), stage)
    return {**result, "dataset": layout.dataset}, Predictions(*probs)


def _members(layout: Layout) -> list[Predictions]:
    stage = f"members@{layout.model}-{layout.dataset}"
    folder = layout.member_predictions()
    seeds = read_json(folder / "members.json", stage)["seeds"]
    return [Predictions(*load_predictions(folder / f"seed-{s}.safetensors", stage)) for s in seeds]


def _shifted(layout: Layout) -> dict:
    path = layout.shift_metrics()
    shifted = read_json(path, f"shift@{layout.model}-{layout.dataset}")
    check_finite(shifted, str(path))
    return shifted


def read_study(params: Params, root: Path) -> Study:
    """The saved results of every model x dataset (x checkpoint) of ``params`` under ``root``;
    a missing or malformed file is an ArtifactError naming the stage that writes it."""
    results, preds, members, shifted = [], {}, {}, {}
    for model in params.models:
        for dataset in params.datasets:
            layout = Layout(model, dataset, root)
            for step in params.checkpoints:
                result, preds[(model, dataset, step)] = _checkpoint(layout, step)
                results.append(result)
            members[(model, dataset)] = _members(layout)
            shifted[(model, dataset)] = _shifted(layout)
    return Study(results, preds, members, shifted)


def dataset_labels(params: Params) -> dict[str, str]:
    """The table column name of every scored dataset (the paper's, e.g. ARC-C); a repeated name
    falls back to the dataset's key."""
    labels: dict[str, str] = {}
    for d in params.scored():
        label = dataset_label(d, params.dataset(d))
        labels[d] = d if label in labels.values() else label
    return labels


def write_study(params: Params, study: Study, metrics_dir: Path, plots_dir: Path) -> None:
    """Every aggregate output, each written atomically: ``comparison.csv|md`` and
    ``shift.csv|md`` under ``metrics_dir``, and :func:`lalora.study.report.write_all`'s."""
    cfg, labels = params.evaluate, dataset_labels(params)
    table = compare(
        study.preds, cfg.ensemble_last, cfg.ece_bins, cfg.bootstrap, members=study.members
    )
    atomic_write_text(metrics_dir / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(metrics_dir / "comparison.md", comparison_markdown(table, labels))
    st = shift_table(study.shifted, labels)
    atomic_write_text(metrics_dir / "shift.csv", st.to_csv(index=False))
    atomic_write_text(metrics_dir / "shift.md", shift_markdown(st))
    bins = reliability_table(finals(study.preds, cfg.ensemble_last, study.members), cfg.ece_bins)
    trained = {d: labels[d] for d in params.datasets}
    write_all(
        study.results, list(params.models), trained, metrics_dir, plots_dir,
        comparison=table, bins=bins, shifted=study.shifted,
    )  # fmt: skip
