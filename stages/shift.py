"""Stage shift@<model>-<dataset>: the final checkpoint fine-tuned on <dataset> scored on the test
splits of the datasets that ``shift.<dataset>`` lists (distribution shift, e.g. OpenBookQA ->
ARC-C and ARC-E), with every method of the comparison. Writes ``{target: metrics}`` (empty when
nothing is listed) and each target's per-example predictions. A target the study does not train
on (not in ``datasets``) has no prepare stage: its test split is prepared here, as ``prepare``
would (same data config, seed and prompt)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from lalora.cli import run
from lalora.config import ConfigError, Params, load_params
from lalora.data import answers_of, load_splits, read_split, write_split
from lalora.devices import resolve
from lalora.distributed import finish, init
from lalora.evaluation import evaluate_split
from lalora.io import atomic_write_json, save_predictions
from lalora.metrics import check_finite
from lalora.models import load_tokenizer
from lalora.pipeline import guard_memory, load_adapted


def test_split(params: Params, target: str, data_dir: Path, scratch: Path) -> Path:
    """The prepared test split of ``target``: ``data/<target>/test.jsonl`` when the study
    prepares it, else written to ``scratch``."""
    if target in params.datasets:
        return data_dir / target / "test.jsonl"
    cfg = params.dataset(target)
    _, test = load_splits(cfg)
    path = scratch / target / "test.jsonl"
    write_split(path, test, answers_of(cfg))
    print(f"prepared the test split of {target} ({len(test)} prompts; not in datasets)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="the dataset fine-tuned on")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="a folder")
    args = parser.parse_args()

    params = load_params(args.params)
    dist = init()
    step = params.checkpoints[-1]
    root = args.models_dir / args.model / args.dataset
    answers = answers_of(params.dataset(args.dataset))
    result = {}
    scratch = Path(tempfile.mkdtemp(prefix="lalora-shift-"))
    adapter = root / "adapters" / f"step-{step}"
    loaded = None  # the model, loaded once for every target
    for target in params.shifted(args.dataset):
        if answers_of(params.dataset(target)) != answers:
            raise ConfigError(
                f"shift.{args.dataset}: {target} answers {answers_of(params.dataset(target))}"
                f", {args.dataset} answers {answers}: a shifted test set needs the same answers"
            )
        test = test_split(params, target, args.data_dir, scratch)
        if loaded is None:
            card = params.card(args.model)
            tok = load_tokenizer(card)
            examples = read_split(test).examples
            guard_memory(params, args.model, "shift", tok, examples, len(answers))
            loaded = load_adapted(card, adapter, device=resolve(params.launch.device))
        ev = evaluate_split(
            params,
            args.model,
            adapter,
            root / "kfac" / f"step-{step}",
            root / "prior" / f"step-{step}.json",
            test,
            dist=dist,
            loaded=loaded,
        )
        if not dist.main:
            continue
        result[target] = {
            "step": step,
            **ev.scores(params.evaluate.ece_bins),
            "laplace_method": ev.laplace,
            "info": ev.info,
        }
        check_finite(result[target], f"shift {args.model} {args.dataset} -> {target}")
        save_predictions(
            args.predictions / f"{target}.safetensors", ev.probs, ev.labels, ev.ids, ev.info
        )
        print(
            f"{args.model} {args.dataset} -> {target}: "
            + ", ".join(f"{m} nll={result[target][m]['nll']:.3f}" for m in ev.probs)
        )
    shutil.rmtree(scratch, ignore_errors=True)
    if dist.main:
        atomic_write_json(args.predictions / "targets.json", sorted(result))
        atomic_write_json(args.out, result)
    finish(dist)


if __name__ == "__main__":
    run(main)
