"""Curvature scale and prior of the Kronecker Laplace posterior, scored on a run's checkpoints.

    python -m bench.priors --model smollm2-135m                 # after `dvc repro`
    python -m bench.priors --steps 200 400 --n-test 300 --out /tmp/priors.md --json /tmp/p.json

For each checkpoint (``models/<model>/<dataset>/adapters/step-<N>``; step 0 is the LoRA
initialisation), two factor fits over the training split (``kfac.normalisation`` ``rows`` and
``sequences_padded``; ``sequences`` is the rows fit rescaled, :func:`renormalise`), one Jacobian
pass over the test split and one over the validation split (the padded fit's features are the
rows fit's rotated, :func:`rebase_features`), then, post hoc, for every normalisation x evidence
(``standard``, ``linear``) x prior mean (zero, the initialisation): the scalar prior precision
maximising that evidence, its log Z, and ACC / NLL / ECE / mean confidence of the linearised
predictive on the test split; beside them the MAP, the validation-NLL prior (LA (val)) and
temperature scaling. Per checkpoint also the mechanism: the training set's mean confidence,
sum_n tr(Lambda_n), theta*' H theta* and where ||theta* - mu||^2 falls (h above or below lambda,
outside the kept ranks), its share along the LoRA symmetry directions, and the size of the data
gradient at theta* that the linear evidence leaves out (with the log Z it would add). With
``--shift`` the final checkpoint is also scored on other datasets' test splits.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lalora.config import ModelCard, Params, load_params
from lalora.config.data import answers_of
from lalora.core.io import atomic_write_json, atomic_write_text
from lalora.core.metrics import score
from lalora.data.datasets import load_splits
from lalora.data.files import read_split
from lalora.laplace.diagnostics import lora_symmetry, penalty_shares
from lalora.laplace.hooks import lora_grad_enabled
from lalora.laplace.kfac import fit_kfac, renormalise
from lalora.laplace.marglik import PriorAtEdgeWarning, log_marginal_likelihood, tune_prior
from lalora.laplace.posterior import Posterior
from lalora.laplace.predictive import (
    jacobian_features,
    logit_covariance,
    predictive_probs,
    rebase_features,
)
from lalora.laplace.tuning import tune_prior_nll
from lalora.models.adapters import adapter_lora_weights, lora_modules
from lalora.models.baselines import fit_temperature
from lalora.models.classifier import answer_token_ids
from lalora.models.pipeline import batches, load_adapted, logits_fn

NORMALISATIONS = ("rows", "sequences", "sequences_padded")
EVIDENCES = ("standard", "linear")
MEANS = ("zero", "init")


def scores(p: torch.Tensor, y: torch.Tensor) -> dict:
    s = score(p, y)
    return {"acc": s.acc, "nll": s.nll, "ece": s.ece, "conf": float(p.max(-1).values.mean())}


def data_gradient(model, train, fn, mods) -> dict[str, torch.Tensor]:
    """g_m = d log p(D | theta) / d W_m at theta* (d_out, d_in), eval mode, float64."""
    total = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in mods.items()}
    with lora_grad_enabled(mods) as params:
        for b in train:
            logp = torch.log_softmax(fn(model, b).double(), -1)
            ll = logp.gather(1, b.labels[:, None]).sum()
            for n, g in zip(mods, torch.autograd.grad(ll, params), strict=True):
                total[n] += g.double()
    return total


def gradient_log_z(
    post: Posterior, grad: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
) -> float:
    """What the data gradient g at theta* would add to the linear evidence at the tuned prior:
    with b = g - lambda delta in 1/2 b^T (H + lambda)^-1 b, the difference to g = 0 is
    1/2 g^T (H + lambda)^-1 g - lambda g^T (H + lambda)^-1 delta (H = A (x) G per module;
    h = 0, i.e. 1/lambda, outside the kept ranks)."""
    out = 0.0
    for name, m in post.modules.items():
        lam = post.prior_precision[name]
        h = torch.outer(m.a.evals, m.g.evals)  # (k_a, k_g)
        g, d = grad[name].double(), delta[name].double()
        gc = m.a.evecs.T @ g.T @ m.g.evecs
        dc = m.delta  # delta's coordinates, set by with_delta
        gg = (
            float((gc.pow(2) / (h + lam)).sum())
            + (float(g.pow(2).sum()) - float(gc.pow(2).sum())) / lam
        )
        gd = (
            float((gc * dc / (h + lam)).sum())
            + (float((g * d).sum()) - float((gc * dc).sum())) / lam
        )
        out += 0.5 * gg - lam * gd
    return out


def padded_features(features, fit: dict[str, Posterior], model, bs, fn, mods):
    """The ``sequences_padded`` fit's features on the batches ``bs``: the rows fit's
    ``features`` rotated (:func:`rebase_features`), or a Jacobian pass of their own where a
    low-rank side differs between the two fits."""
    try:
        return rebase_features(features, fit["rows"], fit["sequences_padded"])
    except ValueError as err:
        print(f"{err}: a Jacobian pass with the padded factors", file=sys.stderr)
        return jacobian_features(model, bs, fn, mods, fit["sequences_padded"])


def provenance(params: Path, root: Path, steps: list[int]) -> dict:
    """What determines a scored run: the code (this script and the ``lalora`` modules it
    imports, with the library versions), the params file and the scored adapters (sha256, 16
    hex digits). ``bench.study`` rescores a run whose recorded provenance differs."""
    from lalora.core.provenance import code_fingerprint

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    return {
        "code": code_fingerprint(Path(__file__)),
        "params": digest(params),
        "adapters": {
            str(s): digest(root / "adapters" / f"step-{s}" / "adapter_model.safetensors")
            for s in sorted({0, *steps})
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=None, help="default: the first of params' datasets")
    parser.add_argument("--steps", type=int, nargs="*", help="default: params' checkpoints")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--n-test", type=int, default=0, help="first N test prompts (0: all)")
    parser.add_argument("--shift", action="append", default=[], help="another test set")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=Path("bench/priors.md"))
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Study:
    """What every checkpoint is scored on: the params, the run's folder ``root``
    (``models/<model>/<dataset>``), the prepared ``splits``, their ``answers``, the shift
    targets' test examples and the checkpoints."""

    params: Params
    card: ModelCard
    root: Path
    splits: dict[str, list]
    answers: tuple[str, ...]
    shifted: dict[str, list]
    steps: list[int]


def load_study(args: argparse.Namespace) -> tuple[Study, dict]:
    """The study's inputs and the result's header (model, dataset, sizes, provenance)."""
    params = load_params(args.params)
    dataset = args.dataset or params.datasets[0]
    params.dataset(dataset)  # a clear error for an unknown name
    root = args.models_dir / args.model / dataset
    splits = {
        name: list(read_split(args.data_dir / dataset / f"{name}.jsonl").examples)
        for name in ("train", "val", "test")
    }
    splits["test"] = splits["test"][: args.n_test or None]
    answers = read_split(args.data_dir / dataset / "test.jsonl").answers
    shifted = {}
    for target in args.shift:
        cfg = params.dataset(target)
        if answers_of(cfg) != answers:
            raise SystemExit(f"--shift {target}: answers {answers_of(cfg)} != {answers}")
        shifted[target] = load_splits(cfg, Path(args.params).resolve().parent)[1]
    steps = args.steps if args.steps else list(params.checkpoints)
    study = Study(params, params.card(args.model), root, splits, answers, shifted, steps)
    result = {
        "model": args.model,
        "dataset": dataset,
        "note": args.note,
        "n": {k: len(v) for k, v in splits.items()},
        "link": params.predictive.link,
        "provenance": provenance(Path(args.params), root, steps),
        "steps": [],
    }
    return study, result


@dataclass
class Fitted:
    """One checkpoint's model and fits: the LoRA modules, the training batches, the factor fit
    of each normalisation, the weights and their differences ``delta`` to each prior mean, the
    test and validation labels, batches and Jacobian features (per normalisation)."""

    model: nn.Module
    tok: object
    mods: dict
    fn: object
    train: list
    fit: dict[str, Posterior]
    weights: dict
    delta: dict
    labels: dict
    feats: dict
    batches: dict


def fit_step(s: Study, step: int) -> Fitted:
    kf, mb, ml = s.params.kfac, s.params.evaluate.batch_size, s.params.finetune.max_length
    adapter = s.root / "adapters" / f"step-{step}"
    tok, model = load_adapted(s.card, adapter)
    mods = lora_modules(model)
    names = list(mods)
    fn = logits_fn(answer_token_ids(tok, s.answers))
    train = list(batches(tok, s.splits["train"], kf.batch_size, ml))
    fit = {
        norm: fit_kfac(model, train, fn, mods, fisher=kf.fisher, rank=kf.rank,
                       max_dense=kf.max_dense, update=kf.update, seed=kf.seed, normalisation=norm)
        for norm in ("rows", "sequences_padded")
    }  # fmt: skip
    fit["sequences"] = renormalise(fit["rows"], "sequences")
    weights = adapter_lora_weights(adapter, names)
    init = adapter_lora_weights(s.root / "adapters" / "step-0", names)
    delta = {
        "zero": {n: w.double() for n, w in weights.items()},
        "init": {n: weights[n].double() - init[n].double() for n in names},
    }
    labels, feats, bs_of = {}, {"rows": {}}, {}
    for split in ("test", "val"):
        bs = bs_of[split] = list(batches(tok, s.splits[split], mb, ml))
        feats["rows"][split] = jacobian_features(model, bs, fn, mods, fit["rows"])
        labels[split] = torch.tensor([e.label for e in s.splits[split]])
    feats["sequences"] = feats["rows"]
    feats["sequences_padded"] = {
        k: padded_features(f, fit, model, bs_of[k], fn, mods) for k, f in feats["rows"].items()
    }
    return Fitted(model, tok, mods, fn, train, fit, weights, delta, labels, feats, bs_of)


def _predictive(s: Study, tuned: Posterior, f) -> torch.Tensor:
    pred = s.params.predictive
    return predictive_probs(f.mean, logit_covariance(f, tuned), pred.link, pred.samples, pred.seed)


def baselines(s: Study, f: Fitted, step: int) -> tuple[dict, float, Posterior]:
    """The step's MAP, temperature scaling and LA (val) scores; the temperature and the
    validation-NLL posterior (the shift targets reuse them)."""
    pr, pred = s.params.prior, s.params.predictive
    y, rows = f.labels["test"], f.feats["rows"]
    entry = {"step": step, "map": scores(torch.softmax(rows["test"].mean, -1), y)}
    temp, _ = fit_temperature(rows["val"].mean, f.labels["val"])
    entry["temperature"] = {"t": temp, **scores(torch.softmax(rows["test"].mean / temp, -1), y)}
    val_tuned, val_edge = tune_prior_nll(
        rows["val"], f.labels["val"], f.fit["rows"], pred.link, pred.samples, pred.seed,
        pr.log10_min, pr.log10_max, pr.grid,
    )  # fmt: skip
    entry["la_val"] = {
        "lambda": val_tuned.prior_precision[next(iter(f.mods))],
        "edge": val_edge,
        **scores(_predictive(s, val_tuned, rows["test"]), y),
    }
    return entry, temp, val_tuned


def variants(s: Study, f: Fitted, step: int, grad: dict) -> list[dict]:
    """Every normalisation x prior mean x evidence: the scalar prior maximising the evidence,
    its log Z, the penalty's split and the test scores."""
    pr, name = s.params.prior, next(iter(f.mods))
    out = []
    for norm in NORMALISATIONS:
        for mean in MEANS:
            centred = f.fit[norm].with_delta(f.delta[mean])
            for ev in EVIDENCES:
                tuned = tune_prior(centred, "scalar", pr.log10_min, pr.log10_max, pr.grid,
                                   where=f"step {step}", accept_edge=True, evidence=ev)  # fmt: skip
                lam = tuned.prior_precision[name]
                edge = (
                    "low" if math.log10(lam) <= pr.log10_min + 1e-9
                    else "high" if math.log10(lam) >= pr.log10_max - 1e-9
                    else None
                )  # fmt: skip
                shares = penalty_shares(tuned)
                row = {
                    "normalisation": norm, "mean": mean, "evidence": ev, "lambda": lam,
                    "edge": edge, "log_z": log_marginal_likelihood(tuned, evidence=ev),
                    "share_above": shares.above, "delta_h_delta": shares.delta_h_delta,
                    **scores(_predictive(s, tuned, f.feats[norm]["test"]), f.labels["test"]),
                }  # fmt: skip
                if ev == "linear":
                    row["gradient_log_z"] = gradient_log_z(tuned, grad, f.delta[mean])
                out.append(row)
                print(f"step {step} {norm} {mean} {ev}: lambda {lam:.3g} NLL {row['nll']:.3f} "
                      f"ECE {row['ece']:.3f}", file=sys.stderr, flush=True)  # fmt: skip
    return out


def mechanism(f: Fitted, grad: dict) -> dict:
    """Why the evidence lands where it does: the training confidence, the Fisher's trace,
    the weights' size and share along the LoRA symmetry, the data gradient's norm."""
    rows_post = f.fit["rows"]

    def trace(post: Posterior) -> float:
        return sum(float(m.a.evals.sum() * m.g.evals.sum()) for m in post.modules.values())

    return {
        "train_confidence": rows_post.train_confidence,
        "fisher_trace": rows_post.fisher_trace,
        "theta_sq": sum(float(w.double().pow(2).sum()) for w in f.weights.values()),
        "delta_sq_init": sum(float(d.pow(2).sum()) for d in f.delta["init"].values()),
        "symmetry_share_init": lora_symmetry(f.weights, f.delta["init"])["share"],
        "symmetry_share_zero": lora_symmetry(f.weights, f.delta["zero"])["share"],
        "gradient_norm": math.sqrt(sum(float(g.pow(2).sum()) for g in grad.values())),
        "trace_ratio_padded_to_rows": trace(f.fit["sequences_padded"]) / max(trace(rows_post),
                                                                              1e-300),
    }  # fmt: skip


def shift(s: Study, f: Fitted, temp: float, val_tuned: Posterior, rows: list[dict]) -> dict:
    """The final checkpoint's scores on each shift target, every method of the step."""
    f.feats.clear()  # each target's features in turn: 4 GB per 300 four-choice prompts
    mb, ml = s.params.evaluate.batch_size, s.params.finetune.max_length
    out_all = {}
    for target, examples in s.shifted.items():
        bs = list(batches(f.tok, examples, mb, ml))
        f_rows = jacobian_features(f.model, bs, f.fn, f.mods, f.fit["rows"])
        yt = torch.tensor([e.label for e in examples])
        out = {"map": scores(torch.softmax(f_rows.mean, -1), yt)}
        out["temperature"] = scores(torch.softmax(f_rows.mean / temp, -1), yt)
        out["la_val"] = scores(_predictive(s, val_tuned, f_rows), yt)
        f_of = {
            "rows": f_rows,
            "sequences": f_rows,
            "sequences_padded": padded_features(f_rows, f.fit, f.model, bs, f.fn, f.mods),
        }
        for v in rows:
            tuned = f.fit[v["normalisation"]].with_prior(v["lambda"])
            key = f"{v['normalisation']}/{v['mean']}/{v['evidence']}"
            out[key] = scores(_predictive(s, tuned, f_of[v["normalisation"]]), yt)
        out_all[target] = out
        del f_rows, f_of
    return out_all


def score_step(s: Study, step: int) -> dict:
    """One checkpoint's entry: baselines, the prior variants, the mechanism (and the shift at
    the final checkpoint)."""
    f = fit_step(s, step)
    entry, temp, val_tuned = baselines(s, f, step)
    grad = data_gradient(f.model, f.train, f.fn, f.mods)
    entry["variants"] = variants(s, f, step, grad)
    entry["mechanism"] = mechanism(f, grad)
    if s.shifted and step == s.steps[-1]:
        entry["shift"] = shift(s, f, temp, val_tuned, entry["variants"])
    return entry


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore", PriorAtEdgeWarning)  # edges are marked in the table
    t0 = time.time()
    study, result = load_study(args)
    for step in study.steps:
        result["steps"].append(score_step(study, step))
        if args.json:
            atomic_write_json(args.json.with_suffix(".partial.json"), result)
    result["seconds"] = time.time() - t0
    text = render(result)
    atomic_write_text(args.out, text)
    if args.json:
        atomic_write_json(args.json, result)
        args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    print(text)


def fmt_lam(v: dict) -> str:
    return f"{v['lambda']:.3g}" + (f" ({v['edge']})" if v.get("edge") else "")


def render(result: dict) -> str:
    """One run's markdown: per checkpoint, a row per method and variant."""
    n = result["n"]
    lines = [
        f"# Curvature scale and prior: {result['model']}, `{result['dataset']}`",
        "",
        f"{result['note']}. Factors from {n['train']} training prompts, LA (val) and "
        f"temperature on {n['val']} validation prompts, metrics on {n['test']} test prompts, "
        f"{result['link']} link; {result.get('seconds', 0):.0f} s. Every marglik row is one "
        "scalar prior maximising its evidence (an edge of the range is marked; high: the MAP).",
        "",
        "| step | method | lambda | log Z | ACC | NLL | ECE | mean conf | share h > lambda |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["steps"]:
        s = e["step"]
        lines.append(f"| {s} | MAP | - | - | {row_metrics(e['map'])} | - |")
        lines.append(
            f"| {s} | temperature (T {e['temperature']['t']:.3g}) | - | - | "
            f"{row_metrics(e['temperature'])} | - |"
        )
        lines.append(
            f"| {s} | LA (val) | {fmt_lam(e['la_val'])} | - | {row_metrics(e['la_val'])} | - |"
        )
        for v in e["variants"]:
            lines.append(
                f"| {s} | {v['normalisation']}, {v['evidence']}, mean {v['mean']} | "
                f"{fmt_lam(v)} | {v['log_z']:.1f} | {row_metrics(v)} | {v['share_above']:.3f} |"
            )
    lines += [
        "",
        "Mechanism per checkpoint (rows fit; delta = theta* - theta_init):",
        "",
        "| step | train conf | sum tr(Lambda_n) | ||theta*||^2 | ||delta||^2 | "
        "symmetry share of ||delta||^2 | ||grad log p(D)|| | trace padded / rows, all modules |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in result["steps"]:
        m = e["mechanism"]
        lines.append(
            f"| {e['step']} | {m['train_confidence']:.4f} | {m['fisher_trace']:.3g} | "
            f"{m['theta_sq']:.1f} | {m['delta_sq_init']:.1f} | {m['symmetry_share_init']:.3f} | "
            f"{m['gradient_norm']:.3g} | {m['trace_ratio_padded_to_rows']:.1f} |"
        )
    for e in result["steps"]:
        for target, out in e.get("shift", {}).items():
            lines += [
                "",
                f"Shift at step {e['step']}: {result['dataset']} -> {target}",
                "",
                "| method | ACC | NLL | ECE | mean conf |",
                "|---|---|---|---|---|",
            ]
            lines += [f"| {k} | {row_metrics(v)} |" for k, v in out.items()]
    return "\n".join(lines) + "\n"


def row_metrics(v: dict) -> str:
    return f"{v['acc']:.3f} | {v['nll']:.3f} | {v['ece']:.3f} | {v['conf']:.3f}"


if __name__ == "__main__":
    main()
