"""Laplace approximation over LoRA weights (Yang et al. 2024, "Bayesian Low-Rank Adaptation for
Large Language Models"): Kronecker factors, marginal likelihood, linearised predictive.

A small API in the spirit of laplace-torch::

    post = fit_kfac(model, batches, logits_fn, modules)        # factors, no prior yet
    post = tune_prior(post)                                    # maximise log Z over lambda
    probs, cov = predict(model, batches, logits_fn, modules, post, link="mc")

Names are imported lazily, so importing one submodule (``lalora.laplace.kfac``) does not import
the others: a pipeline stage depends only on the modules it really uses.
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
    "PriorSearchError": "marglik",
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
    "predictive_probs": "predictive",
    "tune_prior_nll": "predictive",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lalora.laplace' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lalora.laplace.{_EXPORTS[name]}"), name)
