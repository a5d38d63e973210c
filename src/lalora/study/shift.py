"""Distribution shift: one fine-tuned checkpoint scored on the test splits of other datasets.

``shift.<dataset>`` lists the targets of a training dataset (e.g. OpenBookQA -> ARC-C and ARC-E).
The final checkpoint's adapter, factors and prior are read through
:class:`lalora.core.paths.Layout`; a target the study trains on has its prepared test split there,
and a target it does not train on (not in ``datasets``, so without a prepare stage) has its test
split prepared here, as ``prepare`` would (same data config, seed and prompt). The model is loaded
once for all targets.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lalora.config import Params
from lalora.config.data import answers_of
from lalora.core.paths import Layout
from lalora.data.datasets import load_splits
from lalora.data.files import read_split, write_split
from lalora.runtime.distributed import SINGLE, Dist

if TYPE_CHECKING:  # the model's modules are imported for a target: none without one
    from lalora.study.evaluation import Evaluation


@dataclass(frozen=True)
class Shifted:
    """One target's evaluation (``evaluation``) and its metrics record (``metrics``: the final
    step, every method's scores, the configured posterior's key and the fitted quantities)."""

    target: str
    metrics: dict
    evaluation: Evaluation


def target_split(params: Params, target: str, root: Path, scratch: Path) -> Path:
    """The prepared test split of ``target``: the study's own when it prepares it (under
    ``root``), else one prepared into ``scratch``."""
    if target in params.datasets:
        return Layout("", target, root).split("test")
    cfg = params.dataset(target)
    _, test = load_splits(cfg)
    path = scratch / target / "test.jsonl"
    write_split(path, test, answers_of(cfg))
    print(f"prepared the test split of {target} ({len(test)} prompts; not in datasets)")
    return path


def score_targets(params: Params, layout: Layout, dist: Dist = SINGLE) -> Iterator[Shifted]:
    """Each target of ``shift.<layout.dataset>`` scored with every method at the final
    checkpoint of ``layout``, in the configured order (nothing when none is listed; a target
    with other answers is refused when the params load, :func:`lalora.config.check_study`). With
    ``dist`` every process takes part and the main process gets the results."""
    targets = params.shifted(layout.dataset)
    if not targets:
        return
    from lalora.core.metrics import check_finite
    from lalora.models.pipeline import guard_memory, load_adapted
    from lalora.models.zoo import load_tokenizer
    from lalora.runtime.devices import resolve
    from lalora.study.evaluation import evaluate_split

    step = params.checkpoints[-1]
    adapter = layout.adapter(step)
    loaded = None  # (tokenizer, model), loaded once for every target
    scratch = Path(tempfile.mkdtemp(prefix="lalora-shift-"))
    try:
        for target in targets:
            test = target_split(params, target, layout.root, scratch)
            if loaded is None:
                card = params.card(layout.model)
                n_choices = len(answers_of(params.dataset(layout.dataset)))
                examples = read_split(test).examples
                guard_memory(
                    params, layout.model, "shift", load_tokenizer(card), examples, n_choices
                )
                loaded = load_adapted(card, adapter, device=resolve(params.launch.device))
            ev = evaluate_split(
                params, layout.model, adapter, layout.kfac(step), layout.prior(step), test,
                dist=dist, loaded=loaded,
            )  # fmt: skip
            if not dist.main:
                continue
            metrics = {
                "step": step,
                **ev.scores(params.evaluate.ece_bins),
                "laplace_method": ev.laplace,
                "info": ev.info,
            }
            check_finite(metrics, f"shift {layout.model} {layout.dataset} -> {target}")
            yield Shifted(target, metrics, ev)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_shifted(shifted: list[Shifted], predictions: Path) -> dict[str, dict]:
    """Each target's per-example predictions in ``predictions/<target>.safetensors`` and the
    list of targets in ``predictions/targets.json``; returns ``{target: metrics}``, the shift
    stage's metrics file."""
    from lalora.core.io import atomic_write_json, save_predictions

    for s in shifted:
        ev = s.evaluation
        save_predictions(predictions / f"{s.target}.safetensors", ev.probs, ev.labels, ev.ids,
                         ev.info)  # fmt: skip
    atomic_write_json(predictions / "targets.json", sorted(s.target for s in shifted))
    return {s.target: s.metrics for s in shifted}
