"""Laplace approximation over LoRA weights (Yang et al. 2024, "Bayesian Low-Rank Adaptation for
Large Language Models"): Kronecker factors, marginal likelihood, linearised predictive.

A small API in the spirit of laplace-torch::

    post = fit_kfac(model, batches, logits_fn, modules)        # factors, no prior yet
    post = tune_prior(post)                                    # maximise log Z over lambda
    probs, cov = predict(model, batches, logits_fn, modules, post, link="mc")
"""

from lalora.laplace.kfac import Fisher, LowRankUpdate, NonFiniteError, fit_kfac
from lalora.laplace.kron import Factor
from lalora.laplace.marglik import (
    PriorSearchError,
    PriorStructure,
    log_marginal_likelihood,
    tune_prior,
)
from lalora.laplace.posterior import ModuleFactors, Posterior
from lalora.laplace.predictive import (
    JacobianFeatures,
    Link,
    jacobian_features,
    logit_covariance,
    predict,
    predictive_probs,
    tune_prior_nll,
)

__all__ = [
    "Factor",
    "Fisher",
    "JacobianFeatures",
    "Link",
    "LowRankUpdate",
    "ModuleFactors",
    "NonFiniteError",
    "Posterior",
    "PriorSearchError",
    "PriorStructure",
    "fit_kfac",
    "jacobian_features",
    "log_marginal_likelihood",
    "logit_covariance",
    "predict",
    "predictive_probs",
    "tune_prior",
    "tune_prior_nll",
]
