"""Stage evaluate@<model>-<step>: MAP and linearised-Laplace metrics on the test split.

One forward and C - 1 backward passes per batch give both the MAP logits and the Jacobian
features of the Laplace predictive.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from lalora.cli import run
from lalora.config import load_params
from lalora.errors import ArtifactError
from lalora.io import atomic_write_json, read_json
from lalora.laplace.posterior import Posterior
from lalora.laplace.predictive import predict_covariance, predictive_probs
from lalora.metrics import check_finite, score
from lalora.pipeline import load_split_run


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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    params = load_params(args.params)
    cfg, pred = params.evaluate, params.predictive
    prior = read_json(args.prior, "tune_prior")
    try:
        post = Posterior.load(args.kfac).with_prior(prior["prior_precision_by_module"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(
            args.prior, f"malformed ({type(err).__name__}: {err})", "tune_prior"
        ) from None
    if not all(math.isfinite(v) for v in post.prior_precision.values()):
        raise ArtifactError(args.prior, "non-finite prior precision", "tune_prior")
    run = load_split_run(params, args.model, args.adapter, args.data, cfg.batch_size)
    mean, cov = predict_covariance(
        run.model, run.batches, run.logits_fn, run.modules, post, progress=True
    )
    probs = {
        "map": torch.softmax(mean, -1),
        "laplace": predictive_probs(mean, cov, pred.link, pred.samples, pred.seed),
    }
    result = {"model": args.model, "dataset": args.dataset, "step": args.step}
    for method, p in probs.items():
        result[method] = score(p, run.labels, cfg.ece_bins).to_dict()
    result["prior_precision"] = prior["prior_precision"]
    result["log_marginal_likelihood"] = prior["log_marginal_likelihood"]
    result["prior"] = {k: prior.get(k) for k in ("method", "structure", "mean", "at_edge")}
    result["mean_logit_variance"] = float(torch.diagonal(cov, dim1=1, dim2=2).mean())
    check_finite(result, f"evaluate {args.model} {args.dataset} step {args.step}")
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
