"""Stage tune_prior@<model>-<step>: prior precision by marginal likelihood or validation NLL."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.config import Params, load_params
from lalora.io import atomic_write_json
from lalora.laplace.marglik import PriorSearchError, log_marginal_likelihood, tune_prior
from lalora.laplace.posterior import Posterior


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--kfac", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.where = f"tune_prior {args.model} ({args.kfac})"

    params = load_params(args.params)
    post = Posterior.load(args.kfac)
    try:
        edge = None
        if params.prior.method == "marglik":
            tuned = tune_prior(
                post,
                params.prior.structure,
                params.prior.log10_min,
                params.prior.log10_max,
                params.prior.grid,
                where=args.where,
            )
        else:
            tuned, edge = tune_on_validation(params, args, post)
    except PriorSearchError as err:
        raise SystemExit(str(err)) from None
    values = list(tuned.prior_precision.values())
    atomic_write_json(
        args.out,
        {
            "method": params.prior.method,
            "structure": params.prior.structure,
            "prior_precision": values[0] if params.prior.structure == "scalar" else None,
            "prior_precision_by_module": tuned.prior_precision,
            "at_edge": edge,
            "log_marginal_likelihood": log_marginal_likelihood(tuned),
            "n_params": tuned.n_params,
            "n_data": tuned.n_data,
        },
    )


if __name__ == "__main__":
    main()
