"""Stage evaluate@<model>-<step>: MAP and linearised-Laplace metrics on the test split.

One forward and C - 1 backward passes per batch give both the MAP logits and the Jacobian
features of the Laplace predictive.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from lalora.baselines import fit_temperature, mc_dropout_probs
from lalora.cli import run
from lalora.config import load_params
from lalora.data import read_split
from lalora.errors import ArtifactError
from lalora.io import atomic_write_json, read_json, save_predictions
from lalora.laplace.posterior import Posterior
from lalora.laplace.predictive import predict_covariances, predictive_probs
from lalora.metrics import check_finite, score
from lalora.pipeline import load_split_run

LAPLACE_METHODS = ("la", "la_val", "llla")


def posteriors(args: argparse.Namespace, prior: dict, methods: tuple[str, ...]) -> dict:
    """The tuned posteriors to evaluate: ``laplace`` (the configured prior) and each Laplace
    method of ``methods`` that tune_prior computed (LLLA restricted to the lm_head LoRA)."""
    base = Posterior.load(args.kfac)
    tuned = prior.get("methods", {})
    wanted = {"laplace": prior} | {m: tuned.get(m) for m in methods if m in LAPLACE_METHODS}
    out = {}
    for key, entry in wanted.items():
        if entry is None:
            if key == "llla":
                print("llla: the model has no lm_head LoRA; skipped", file=sys.stderr)
                continue
            raise ArtifactError(args.prior, f"no tuned prior for {key}", "tune_prior")
        try:
            by_module = entry["prior_precision_by_module"]
            post = base.restrict(list(by_module)).with_prior(by_module)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(
                args.prior, f"malformed ({type(err).__name__}: {err})", "tune_prior"
            ) from None
        if not all(math.isfinite(v) for v in post.prior_precision.values()):
            raise ArtifactError(args.prior, f"non-finite prior precision ({key})", "tune_prior")
        out[key] = post
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="a key of data in params.yaml")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--kfac", type=Path, required=True)
    parser.add_argument("--prior", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True, help="for temperature scaling")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    args = parser.parse_args()

    params = load_params(args.params)
    cfg, pred = params.evaluate, params.predictive
    prior = read_json(args.prior, "tune_prior")
    posts = posteriors(args, prior, cfg.methods)
    run = load_split_run(params, args.model, args.adapter, args.data, cfg.batch_size)
    mean, covs = predict_covariances(
        run.model, run.batches, run.logits_fn, run.modules, posts, progress=True
    )
    probs = {"map": torch.softmax(mean, -1)}
    for key, cov in covs.items():
        probs[key] = predictive_probs(mean, cov, pred.link, pred.samples, pred.seed)
    info: dict = {}
    if "temperature" in cfg.methods:
        val = load_split_run(params, args.model, args.adapter, args.val, cfg.batch_size)
        val_logits = torch.cat([val.logits_fn(val.model, b).detach() for b in val.batches])
        t, edge = fit_temperature(val_logits, val.labels)
        probs["temperature"] = torch.softmax(mean / t, -1)
        info["temperature"] = {"T": t, "at_edge": edge}
    if "mc_dropout" in cfg.methods:
        probs["mc_dropout"] = mc_dropout_probs(
            run.model, run.batches, run.logits_fn, cfg.mc_samples, pred.seed
        )
    result = {"model": args.model, "dataset": args.dataset, "step": args.step}
    for method, p in probs.items():
        result[method] = score(p, run.labels, cfg.ece_bins).to_dict()
    result["prior_precision"] = prior["prior_precision"]
    result["log_marginal_likelihood"] = prior["log_marginal_likelihood"]
    result["prior"] = {k: prior.get(k) for k in ("method", "structure", "mean", "at_edge")}
    result["mean_logit_variance"] = float(torch.diagonal(covs["laplace"], dim1=1, dim2=2).mean())
    result["methods"] = sorted(probs)
    result["info"] = info
    check_finite(result, f"evaluate {args.model} {args.dataset} step {args.step}")
    ids = [e.id for e in read_split(args.data).examples]
    save_predictions(args.predictions, probs, run.labels, ids, {"step": args.step, **info})
    atomic_write_json(args.out, result)
    print(
        f"{args.model} {args.dataset} step {args.step}: "
        + ", ".join(
            f"{m} acc={result[m]['acc']:.3f} nll={result[m]['nll']:.3f} ece={result[m]['ece']:.3f}"
            for m in probs
        )
    )


if __name__ == "__main__":
    run(main)
