"""One checkpoint's priors, as the ``tune_prior`` stage tunes them: the posterior centred at the
configured prior mean (:func:`lalora.laplace.tuning.centre`), one Jacobian pass over the
prepared validation split (when it has prompts) and every prior of the comparison and the
temperature from it (:func:`lalora.laplace.tuning.tune_priors`), as the prior file's record."""

from __future__ import annotations

from pathlib import Path

from lalora.config import Params
from lalora.core.metrics import check_finite
from lalora.data.files import read_split
from lalora.laplace import Posterior, Validation, centre, jacobian_features, record, tune_priors
from lalora.models.adapters import adapter_lora_weights
from lalora.models.pipeline import load_split_run
from lalora.runtime.distributed import SINGLE, Dist


def tune_checkpoint(
    params: Params, model_name: str, kfac: Path, adapter: Path, init: Path, val: Path,
    dist: Dist = SINGLE,
) -> dict | None:  # fmt: skip
    """The prior file's content (:func:`lalora.laplace.tuning.record`, checked finite) for the
    factors in ``kfac`` of ``model_name`` with ``adapter``; ``init``: the step-0 adapter (the
    prior mean when ``prior.mean`` is ``init``); ``val``: the prepared validation split. Every
    process of ``dist`` takes part in the validation pass; the main one gets the record, the
    others None."""
    where = f"tune_prior {model_name} ({kfac})"
    post = Posterior.load(kfac)
    names = list(post.modules)
    init_weights = adapter_lora_weights(init, names) if params.prior.mean == "init" else None
    post, symmetry = centre(post, adapter_lora_weights(adapter, names), init_weights)
    validation = None
    if read_split(val).examples:  # one Jacobian pass over the validation split
        split = load_split_run(params, model_name, adapter, val, params.evaluate.batch_size,
                               stage="tune_prior")  # fmt: skip
        feats = jacobian_features(split.model, split.batches, split.logits_fn, split.modules, post,
                                  dist=dist)  # fmt: skip
        validation = Validation(feats, split.labels)
    if not dist.main:
        return None
    tuned = tune_priors(post, validation, params.prior, params.predictive, where)
    result = record(tuned, params.prior, symmetry)
    check_finite(result, where)
    return result
