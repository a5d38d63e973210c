"""Stage tune_prior@<model>-<step>: prior precision by marginal likelihood or validation NLL."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lalora.baselines import fit_temperature
from lalora.cli import run
from lalora.config import ConfigError, Params, load_params
from lalora.distributed import current, finish, init
from lalora.io import atomic_write_json
from lalora.laplace.diagnostics import lora_symmetry, penalty_shares
from lalora.laplace.marglik import edges_of, log_marginal_likelihood, tune_prior
from lalora.laplace.posterior import Posterior, last_layer_modules
from lalora.metrics import check_finite
from lalora.models import adapter_lora_weights


def validation_features(params: Params, args: argparse.Namespace, post: Posterior):
    """One Jacobian pass over the validation split (every LoRA module): the features and labels
    that validation-NLL tuning of any sub-posterior reads; None without a validation split."""
    from lalora.data import read_split
    from lalora.laplace.predictive import jacobian_features
    from lalora.pipeline import load_split_run

    val = read_split(args.val)
    if not val.examples:
        return None
    run = load_split_run(
        params, args.model, args.adapter, args.val, params.evaluate.batch_size,
        stage="tune_prior",
    )  # fmt: skip
    feats = jacobian_features(
        run.model, run.batches, run.logits_fn, run.modules, post, dist=current()
    )
    return feats, run.labels


def tune_on_validation(params: Params, args: argparse.Namespace, post: Posterior, val) -> Posterior:
    """The scalar prior of ``post`` (any subset of the modules) minimising the validation NLL."""
    from lalora.laplace.predictive import tune_prior_nll

    feats, labels = val
    pred, pr = params.predictive, params.prior
    tuned, _ = tune_prior_nll(
        feats, labels, post, pred.link, pred.samples, pred.seed,
        pr.log10_min, pr.log10_max, pr.grid, where=args.where,
    )  # fmt: skip
    return tuned


def tune_marglik(params: Params, args: argparse.Namespace, post: Posterior) -> Posterior:
    pr = params.prior
    return tune_prior(
        post, pr.structure, pr.log10_min, pr.log10_max, pr.grid, where=args.where,
        accept_edge=True, evidence=pr.evidence,
    )  # fmt: skip


def entry(params: Params, tuned: Posterior) -> dict:
    """What evaluate reads of one tuned posterior."""
    values = list(tuned.prior_precision.values())
    edges = edges_of(tuned.prior_precision, params.prior.log10_min, params.prior.log10_max)
    return {
        # scalar: the precision; layerwise: the geometric mean over modules
        "prior_precision": math.exp(sum(math.log(v) for v in values) / len(values)),
        "prior_precision_by_module": tuned.prior_precision,
        "at_edge": sorted(set(edges.values())),
        "modules_at_edge": edges,
        "log_marginal_likelihood": log_marginal_likelihood(tuned, evidence=params.prior.evidence),
        "theta_sq": tuned.theta_sq,
        "n_params": tuned.n_params,
        "curvature": penalty_shares(tuned).as_dict(),
    }


def centre_prior(
    params: Params, args: argparse.Namespace, post: Posterior
) -> tuple[Posterior, dict]:
    """The posterior centred at the prior mean (zero, or the step-0 adapter for ``prior.mean:
    init``): theta* - mu per module, its norm and its Kronecker eigenbasis coordinates; and the
    share of ||theta* - mu||^2 along the LoRA symmetry directions."""
    names = list(post.modules)
    weights = adapter_lora_weights(args.adapter, names)
    if params.prior.mean == "zero":
        delta = {n: w.double() for n, w in weights.items()}
    else:
        init = adapter_lora_weights(args.init, names)
        delta = {n: weights[n].double() - init[n].double() for n in names}
    return post.with_delta(delta), lora_symmetry(weights, delta)


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
    dist = init()
    pr = params.prior
    post, symmetry = centre_prior(params, args, Posterior.load(args.kfac))
    val = validation_features(params, args, post)  # split over the processes
    if not dist.main:
        return finish(dist)
    if pr.method == "val_nll" and val is None:
        raise ConfigError(
            "prior.method val_nll needs a validation split: set data.<dataset>.val_size > 0"
        )
    last = last_layer_modules(list(post.modules))
    # LA: marginal-likelihood prior; LA (val): validation-NLL prior; LLLA: the lm_head LoRA
    # only, with the configured method
    tuned = {"la": tune_marglik(params, args, post)}
    if val is not None:
        tuned["la_val"] = tune_on_validation(params, args, post, val)
    if last:
        sub = post.restrict(last)
        tuned["llla"] = (
            tune_marglik(params, args, sub)
            if pr.method == "marglik"
            else tune_on_validation(params, args, sub, val)
        )
    configured = tuned["la" if pr.method == "marglik" else "la_val"]
    # temperature scaling reads the same validation logits (the MAP's, from the features)
    temperature = None
    if val is not None:
        T, edge = fit_temperature(val[0].mean, val[1])
        temperature = {"T": T, "at_edge": edge}
    result = {
        "method": pr.method,
        "structure": pr.structure,
        "mean": pr.mean,
        "evidence": pr.evidence,
        "normalisation": post.normalisation,
        **entry(params, configured),
        "n_data": configured.n_data,
        "train_confidence": post.train_confidence,
        "fisher_trace": post.fisher_trace,
        "symmetry": symmetry,
        "methods": {k: entry(params, v) for k, v in tuned.items()},
        "temperature": temperature,
    }
    check_finite(result, args.where)
    atomic_write_json(args.out, result)
    finish(dist)


if __name__ == "__main__":
    run(main)
