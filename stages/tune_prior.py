"""Stage tune_prior@<model>-<step>: the comparison's priors (marginal likelihood, validation
NLL, last layer) and the temperature, from one validation pass (:mod:`lalora.laplace.tuning`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.adapters import adapter_lora_weights
from lalora.cli import run
from lalora.config import load_params
from lalora.data import read_split
from lalora.distributed import current, finish, init
from lalora.io import atomic_write_json
from lalora.laplace import Posterior, Validation, centre, jacobian_features, record, tune_priors
from lalora.metrics import check_finite
from lalora.pipeline import load_split_run


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
    where = f"tune_prior {args.model} ({args.kfac})"

    params = load_params(args.params)
    dist = init()
    post = Posterior.load(args.kfac)
    names = list(post.modules)
    init_weights = adapter_lora_weights(args.init, names) if params.prior.mean == "init" else None
    post, symmetry = centre(post, adapter_lora_weights(args.adapter, names), init_weights)
    val = None
    if read_split(args.val).examples:  # one Jacobian pass over the validation split
        split = load_split_run(params, args.model, args.adapter, args.val,
                             params.evaluate.batch_size, stage="tune_prior")  # fmt: skip
        feats = jacobian_features(split.model, split.batches, split.logits_fn, split.modules, post,
                                  dist=current())  # fmt: skip
        val = Validation(feats, split.labels)
    if not dist.main:
        return finish(dist)
    tuned = tune_priors(post, val, params.prior, params.predictive, where)
    result = record(tuned, params.prior, symmetry)
    check_finite(result, where)
    atomic_write_json(args.out, result)
    finish(dist)


if __name__ == "__main__":
    run(main)
