"""Calibrated predictions for new inputs from a study's artifacts.

``python -m lalora.predict --model M --dataset D [--step N] (--input FILE | --question Q
--choices C1 C2 ...) [--method la|la_val|llla] [--out FILE]`` loads the adapter of step N (the
final checkpoint by default), its Kronecker factors and tuned priors, and prints, per prompt and
choice, the MAP probability, the Laplace probability and the standard deviation of each logit
contrast f_c - f_C. Nothing is trained or fitted: a missing artifact is refused, naming the
stage that makes it. ``--input`` reads a prepared split (``data/D/test.jsonl``, whose first
line lists the answers) or records in the dataset's own format (the benchmark's, or the custom
schema's); ``--question`` with ``--choices`` renders one prompt with the dataset's template.

:func:`load` returns the :class:`Predictor` the command wraps.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lalora.config import DataConfig, Params, load_params
from lalora.config.edits import flatten
from lalora.core.errors import ArtifactError, UserError
from lalora.core.paths import Layout
from lalora.data.files import Example

if TYPE_CHECKING:  # torch is imported where the model is: a refused request never needs it
    from lalora.laplace.lora import LaplaceLoRA, Prediction


class PredictError(UserError, ValueError):
    """The input cannot be turned into prompts of this dataset."""


@dataclass(frozen=True)
class Predictor:
    """A study's checkpoint (``step``) of ``model`` fine-tuned on ``dataset``, with its tuned
    posteriors (``laplace``), and the dataset's config and answers for rendering prompts."""

    laplace: LaplaceLoRA
    data: DataConfig
    answers: tuple[str, ...]
    step: int

    def predict(self, prompts: list[str] | list[Example], method: str | None = None) -> Prediction:
        """MAP and Laplace probabilities (N, C) and contrast standard deviations (N, C - 1)
        of ``prompts`` (strings, or prepared examples) under ``method`` (the configured
        posterior by default)."""
        if prompts and isinstance(prompts[0], Example):
            return self.laplace.predict_examples(list(prompts), method)
        return self.laplace.predict(list(prompts), method)

    def render(self, question: str, choices: list[str]) -> Example:
        """One prompt of this dataset's format from a question and its choices."""
        return render(self.data, self.answers, question, choices)

    def read(self, path: Path) -> list[Example]:
        """The prompts of a prepared split, or of records in the dataset's own format."""
        return read(self.data, self.answers, path)


def render(cfg: DataConfig, answers: tuple[str, ...], question: str, choices: list[str]) -> Example:
    """One prompt of dataset ``cfg``'s format from a question and its choices (checked as the
    dataset's own records are, before any model is loaded)."""
    if len(choices) != len(answers):
        raise PredictError(
            f"{len(choices)} choices given; dataset {cfg.name!r} has "
            f"{len(answers)} ({', '.join(a.strip() for a in answers)})"
        )
    return _example(cfg, _question_record(cfg, question, choices), "--question")


def read(cfg: DataConfig, answers: tuple[str, ...], path: Path) -> list[Example]:
    """The prompts of a prepared split, or of records in dataset ``cfg``'s own format; a
    missing or empty file is refused."""
    from lalora.data.files import read_jsonl, read_split

    if not path.is_file():
        raise PredictError(f"--input {path}: no such file")
    rows = list(read_jsonl(path))
    if not rows:
        raise PredictError(f"--input {path}: no records (the file is empty)")
    if "answers" in rows[0][1]:
        split = read_split(path)
        if split.answers != answers:
            raise PredictError(
                f"{path}: answers {list(split.answers)}, and the model answers {list(answers)}"
            )
        if not split.examples:
            raise PredictError(f"--input {path}: a prepared split with no examples")
        return list(split.examples)
    return [_example(cfg, record, f"{path}:{i}") for i, record in rows]


def _question_record(cfg: DataConfig, question: str, choices: list[str]) -> dict:
    if cfg.name == "custom":
        s = cfg.schema
        fields = dict(zip(s.choices, choices, strict=True)) if len(s.choices) > 1 else {
            s.choices[0]: choices
        }  # fmt: skip
        return {s.question: question, **fields, s.answer: 0}
    if cfg.name in ("generated", "winogrande"):
        return {"sentence": question, "option1": choices[0], "option2": choices[1], "answer": "1"}
    if cfg.name == "boolq":
        raise PredictError("a BoolQ prompt needs its passage: give records with --input")
    labels = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]
    return {"question": {"stem": question, "choices": [
        {"text": t, "label": lab} for t, lab in zip(choices, labels, strict=True)
    ]}, "answerKey": "A"}  # fmt: skip


def _example(cfg: DataConfig, record: dict, where: str) -> Example:
    """A record of the dataset's own format as an example (its label is not used)."""
    from lalora.data.datasets import DATASETS, winogrande_prompt
    from lalora.data.files import DataError
    from lalora.data.qa import QAFormatError

    try:
        if cfg.name == "custom":
            from lalora.data import custom

            return Example(*custom.parse(record, cfg.schema, where))
        if DATASETS.get(cfg.name) is None:  # generated: WinoGrande's format
            return winogrande_prompt(record, where)
        parsed = DATASETS[cfg.name].parse(record, where)
    except (QAFormatError, DataError, ValueError) as err:
        raise PredictError(str(err)) from None
    if parsed is None:
        raise PredictError(f"{where}: the dataset's preparation drops this record")
    return Example(*parsed)


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise ArtifactError(path, "missing: the study has not made it yet", stage)
    return path


class StaleError(UserError, RuntimeError):
    """An artifact predict would read no longer matches the params, code or data that DVC
    says determine it."""


@dataclass(frozen=True)
class Plan:
    """What :func:`load` reads, checked before any weight is: the params with the model's card
    pruned as the study's prune stage chose, the data config and its answers, the checkpoint,
    and the artifacts' paths."""

    params: Params
    model: str
    data: DataConfig
    answers: tuple[str, ...]
    step: int
    layout: Layout

    @property
    def name(self) -> str:
        return f"{self.model}-{self.layout.dataset}-{self.step}"


def plan(model: str, dataset: str, step: int | None = None,
         params: Params | str | Path = "params.yaml", root: Path | str = ".") -> Plan:  # fmt: skip
    """Check the request against the study (a known model, a trained dataset, a checkpoint) and
    that every artifact exists; read the prune stage's choice into the model's card, as every
    stage after ``prune`` does."""
    from lalora.config.data import answers_of
    from lalora.models.prune import pruned

    params = params if isinstance(params, Params) else load_params(Path(root) / params)
    params.card(model)  # an unknown model: one message naming the zoo
    if model not in params.models:
        raise PredictError(f"model {model!r} is not in the study: {list(params.models)}")
    if dataset not in params.datasets:
        raise PredictError(f"dataset {dataset!r} is not in the study: {list(params.datasets)}")
    step = params.checkpoints[-1] if step is None else step
    if step not in params.checkpoints:
        raise PredictError(f"step {step} is not a checkpoint: {list(params.checkpoints)}")
    layout = Layout(model, dataset, Path(root))
    name = f"{model}-{dataset}-{step}"
    needed = {
        layout.split("train"): f"prepare@{dataset}",
        layout.adapter(step): f"export@{name}",
        layout.kfac(step): f"fit_kfac@{name}",
        layout.prior(step): f"tune_prior@{name}",
    }
    for path, stage in needed.items():
        _need(path, stage)
    if params.prune.layers:  # the layers the prune stage removed (its file holds none at 0)
        _need(layout.prune(), f"prune@{model}-{dataset}")
    params = pruned(params, model, layout.prune() if layout.prune().exists() else None)
    cfg = params.dataset(dataset)
    return Plan(params, model, cfg, answers_of(cfg), step, layout)


def stale(p: Plan) -> dict[str, list[str]]:
    """The stages behind ``p``'s artifacts (``tune_prior@...`` and everything it depends on)
    that DVC finds out of date, with why: params, code or data changed since the lock file
    recorded them, or an output edited (``dvc status``); and the raw data's digest against the
    one ``prepare`` read (DVC's ``sources`` stage recomputes it only at the next repro)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from lalora.core.io import read_json
    from lalora.data.datasets import source_digest

    root = p.layout.root
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        raise StaleError(
            f"{root.resolve()} is not a DVC project, so nothing records what made its "
            "artifacts: run the study with dvc repro, or pass --allow-stale to predict from them "
            "as they are"
        )
    try:
        with Repo(str(root)) as repo:
            found = repo.status(targets=[f"tune_prior@{p.name}"], with_deps=True)
    except DvcException as err:
        raise StaleError(f"dvc status on {root}: {err}") from None
    found = {k.split(":")[-1]: vs for k, vs in found.items()}
    found.pop("sources", None)  # it runs at every repro
    # the lock file's params and params.yaml are read only to say which keys changed
    lock, now = (_locked_params(root), _current_params(root)) if found else ({}, {})
    out = {stage: [_why(v, lock.get(stage, {}), now) for v in vs] for stage, vs in found.items()}
    digest = root / "data" / "sources" / f"{p.layout.dataset}.json"
    if digest.is_file() and read_json(digest, "sources") != source_digest(p.data, root):
        out.setdefault(f"prepare@{p.layout.dataset}", []).append("its raw data files changed")
    return out


def _locked_params(root: Path) -> dict[str, dict]:
    """Each stage's params as ``dvc.lock`` recorded them: ``{stage: {key: value}}``."""
    import yaml

    path = root / "dvc.lock"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.is_file() else {}
    return {name: s.get("params", {}).get("params.yaml", {}) for name, s in stages.items()}


def _current_params(root: Path) -> dict[str, object]:
    """``params.yaml``'s leaves by dotted key (:func:`lalora.config.edits.flatten`)."""
    import yaml

    return flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})


def _changed_keys(recorded: dict, now: dict[str, object]) -> list[str]:
    """The params keys (leaves, e.g. ``kfac.rank``) whose value in ``params.yaml`` (``now``,
    its leaves) is not the one the lock file recorded. A recorded key is matched whole, so a
    name that holds a dot (``zoo.qwen2.5``) is found."""
    changed = []
    for key, old in recorded.items():
        before = flatten(old, key)
        after = {k: v for k, v in now.items() if k == key or k.startswith(f"{key}.")}
        changed += sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return changed


def _why(entry, recorded: dict, now: dict[str, object]) -> str:
    """One ``dvc status`` entry in words: what changed (params by their keys, files by path)."""
    if isinstance(entry, str):
        return entry
    parts = []
    for kind, what in entry.items():
        if not isinstance(what, dict):
            parts.append(str(kind))
            continue
        names = []
        for path, how in what.items():
            if isinstance(how, dict):  # a params file: the keys DVC tracks, then their leaves
                names += _changed_keys({k: recorded.get(k) for k in how}, now) or list(how)
            else:
                names.append(str(path))
        parts.append(f"{kind}: {', '.join(names[:4])}")
    return "; ".join(parts)


def check_current(p: Plan) -> None:
    """Refuse stale artifacts (:func:`stale`), naming each stage, why, and the command that
    makes them current."""
    found = stale(p)
    if found:
        lines = "; ".join(f"{stage} ({', '.join(why)})" for stage, why in found.items())
        raise StaleError(
            f"the artifacts of {p.name} are stale: {lines}. Run dvc repro "
            f"tune_prior@{p.name} (or dvc repro) to bring them up to date, or pass --allow-stale "
            "to predict from them as they are"
        )


def load(
    model: str, dataset: str, step: int | None = None, params: Params | str | Path = "params.yaml",
    root: Path | str = ".", allow_stale: bool = False,
) -> Predictor:  # fmt: skip
    """The :class:`Predictor` of checkpoint ``step`` (default: the final one) of ``model``
    fine-tuned on ``dataset``, from the study's artifacts under ``root``: checked first
    (:func:`plan`) and, unless ``allow_stale``, refused where DVC finds them out of date
    (:func:`check_current`); then the model is loaded as ``evaluate`` loads it (pruned as the
    study chose)."""
    p = plan(model, dataset, step, params, root)
    if not allow_stale:
        check_current(p)
    return build(p)


def build(p: Plan) -> Predictor:
    """Load the model, its adapter and the tuned posteriors of a checked :class:`Plan`."""
    from lalora.core.io import read_json
    from lalora.data.files import read_split
    from lalora.laplace.tuning import TunedPriors
    from lalora.models.classifier import answer_token_ids
    from lalora.models.pipeline import load_adapted
    from lalora.runtime.devices import resolve
    from lalora.study.evaluation import LAPLACE_METHODS, configured_method, posteriors

    params, layout, name = p.params, p.layout, p.name
    prior_path = layout.prior(p.step)
    prior = read_json(prior_path, f"tune_prior@{name}")
    posts = posteriors(layout.kfac(p.step), prior_path, prior, LAPLACE_METHODS)
    T = prior.get("temperature")
    tuned = TunedPriors(posts, configured_method(prior["method"]),
                        None if T is None else (T["T"], T["at_edge"]))  # fmt: skip
    tok, net = load_adapted(params.card(p.model), layout.adapter(p.step),
                            device=resolve(params.launch.device))  # fmt: skip
    # the answer tokens the model was trained on: those that continue the training prompts
    train = read_split(layout.split("train")).examples
    ids = answer_token_ids(tok, p.answers, [e.prompt for e in train])
    from lalora.laplace.lora import LaplaceLoRA

    laplace = LaplaceLoRA(net, tok, ids, tuned, params.predictive, params.evaluate.batch_size,
                          params.finetune.max_length)  # fmt: skip
    return Predictor(laplace, p.data, p.answers, p.step)


def rows(pred: Prediction, examples: list[Example], answers: tuple[str, ...], method: str):
    """One json-able dict per prompt: its id and prompt, and per choice the MAP and Laplace
    probabilities; the standard deviation of each contrast (choice c against the last)."""
    letters = [a.strip() for a in answers]
    for i, e in enumerate(examples):
        yield {
            "id": e.id, "prompt": e.prompt, "method": method,
            "choices": {
                c: {"map": float(pred.map[i, j]), "laplace": float(pred.probs[i, j])}
                for j, c in enumerate(letters)
            },
            "contrast_std": {
                f"{c}-{letters[-1]}": float(pred.std[i, j]) for j, c in enumerate(letters[:-1])
            },
        }  # fmt: skip


def show(row: dict) -> str:
    lines = [f"{row['id']}: {row['prompt']}", "  choice     MAP  Laplace"]
    for c, p in row["choices"].items():
        lines.append(f"  {c:<6} {p['map']:7.4f}  {p['laplace']:7.4f}")
    stds = ", ".join(f"{k} {v:.3f}" for k, v in row["contrast_std"].items())
    return "\n".join([*lines, f"  logit contrast std ({row['method']}): {stds}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--step", type=int, help="a checkpoint (default: the final one)")
    parser.add_argument("--method", choices=["la", "la_val", "llla"],
                        help="the posterior (default: the configured prior's)")  # fmt: skip
    parser.add_argument("--input", type=Path, help="a JSONL of prompts")
    parser.add_argument("--question")
    parser.add_argument("--choices", nargs="+")
    parser.add_argument("--out", type=Path, help="write one JSON line per prompt here")
    parser.add_argument("--allow-stale", action="store_true",
                        help="predict from artifacts DVC finds out of date")  # fmt: skip
    args = parser.parse_args(argv)
    if (args.input is None) == (args.question is None) or (args.question and not args.choices):
        parser.error("give --input FILE, or --question with --choices")

    p = plan(args.model, args.dataset, args.step, args.params)
    if args.input:
        examples = read(p.data, p.answers, args.input)
    else:
        examples = [render(p.data, p.answers, args.question, args.choices)]
    if not args.allow_stale:
        check_current(p)
    predictor = build(p)
    method = args.method or predictor.laplace.tuned.configured
    pred = predictor.predict(examples, method)
    out = list(rows(pred, examples, predictor.answers, method))
    if args.out:
        from lalora.core.io import atomic_write_text

        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in out))
        print(f"wrote {len(out)} predictions to {args.out}", file=sys.stderr)
    else:
        print("\n".join(show(r) for r in out))
