"""Laplace approximation over LoRA weights (Yang et al. 2024, "Bayesian Low-Rank Adaptation for
Large Language Models"): Kronecker factors, marginal likelihood, linearised predictive.

The API the pipeline's stages use, in the spirit of laplace-torch::

    post = fit_kfac(model, batches, logits_fn, modules)        # factors, no prior yet
    post, _ = centre(post, lora_weights)                       # the prior mean (zero)
    tuned = tune_priors(post, Validation(features, labels), PriorConfig(), PredictiveConfig())
    mean, covs = predict_covariances(model, batches, logits_fn, modules, tuned.posteriors)
    probs = predictive_probs(mean, covs["la_val"], link="mc")

:func:`laplace_lora` does all of it for any PEFT LoRA model and a list of (prompt, answer)
pairs (README, "Laplace-LoRA on your own PEFT model").

Names are imported lazily, so importing one of them imports only its submodule: a pipeline
stage depends only on the modules it really uses (:func:`lalora.core.provenance.lazy_exports` reads
``_EXPORTS`` to follow them).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Factor": "kron",
    "Fisher": "kfac",
    "LowRankUpdate": "kfac",
    "NonFiniteError": "kfac",
    "fit_kfac": "kfac",
    "PriorAtEdgeWarning": "marglik",
    "PriorStructure": "marglik",
    "log_marginal_likelihood": "marglik",
    "tune_prior": "marglik",
    "ModuleFactors": "posterior",
    "Posterior": "posterior",
    "JacobianFeatures": "predictive",
    "Link": "predictive",
    "jacobian_features": "predictive",
    "logit_covariance": "predictive",
    "predict": "predictive",
    "predict_covariances": "predictive",
    "predictive_probs": "predictive",
    "tune_prior_nll": "tuning",
    "TunedPriors": "tuning",
    "Validation": "tuning",
    "centre": "tuning",
    "prior_summary": "tuning",
    "record": "tuning",
    "tune_priors": "tuning",
    "LaplaceLoRA": "lora",
    "Prediction": "lora",
    "laplace_lora": "lora",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lalora.laplace' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lalora.laplace.{_EXPORTS[name]}"), name)
