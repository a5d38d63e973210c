"""Stage tune_prior@<model>-<step>: prior precision by marginal likelihood or validation NLL."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lalora.cli import run
from lalora.config import Params, load_params
from lalora.io import atomic_write_json
from lalora.laplace.marglik import (
    PriorSearchError,
    edges_of,
    log_marginal_likelihood,
    squared_distances,
    tune_prior,
)
from lalora.laplace.posterior import Posterior
from lalora.metrics import check_finite
from lalora.models import adapter_lora_weights


def tune_on_validation(
    params: Params, args: argparse.Namespace, post: Posterior
) -> tuple[Posterior, str | None]:
    """Validation-NLL tuning: one Jacobian pass over the validation split, then a 1-D search."""
    from lalora.data import read_split
    from lalora.laplace.predictive import jacobian_features, tune_prior_nll
    from lalora.pipeline import load_split_run

    if params.prior.structure != "scalar":
        raise SystemExit("prior.method val_nll supports prior.structure scalar only")
    if not read_split(args.val).examples:
        raise SystemExit("prior.method val_nll needs a validation split: set data.val_size > 0")
    run = load_split_run(params, args.model, args.adapter, args.val, params.evaluate.batch_size)
    feats = jacobian_features(run.model, run.batches, run.logits_fn, run.modules, post)
    pred = params.predictive
    return tune_prior_nll(
        feats,
        run.labels,
        post,
        pred.link,
        pred.samples,
        pred.seed,
        params.prior.log10_min,
        params.prior.log10_max,
        params.prior.grid,
        where=args.where,
    )


def centre_prior(params: Params, args: argparse.Namespace, post: Posterior) -> Posterior:
    """``prior.mean: init``: ||theta* - theta_init||^2 per module from the step-0 adapter."""
    if params.prior.mean == "zero":
        return post
    names = list(post.modules)
    return post.with_theta_sq(
        squared_distances(
            adapter_lora_weights(args.adapter, names), adapter_lora_weights(args.init, names)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--kfac", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True, help="the step-0 adapter")
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.where = f"tune_prior {args.model} ({args.kfac})"

    params = load_params(args.params)
    pr = params.prior
    post = centre_prior(params, args, Posterior.load(args.kfac))
    try:
        if pr.method == "marglik":
            tuned = tune_prior(
                post,
                pr.structure,
                pr.log10_min,
                pr.log10_max,
                pr.grid,
                where=args.where,
                accept_edge=True,
            )
        else:
            tuned, _ = tune_on_validation(params, args, post)
    except PriorSearchError as err:
        raise SystemExit(str(err)) from None
    values = list(tuned.prior_precision.values())
    edges = edges_of(tuned.prior_precision, pr.log10_min, pr.log10_max)
    result = {
        "method": pr.method,
        "structure": pr.structure,
        "mean": pr.mean,
        # scalar: the precision; layerwise: the geometric mean over modules
        "prior_precision": math.exp(sum(math.log(v) for v in values) / len(values)),
        "prior_precision_by_module": tuned.prior_precision,
        "at_edge": sorted(set(edges.values())),
        "modules_at_edge": edges,
        "log_marginal_likelihood": log_marginal_likelihood(tuned),
        "theta_sq": tuned.theta_sq,
        "n_params": tuned.n_params,
        "n_data": tuned.n_data,
    }
    check_finite(result, args.where)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    run(main)
