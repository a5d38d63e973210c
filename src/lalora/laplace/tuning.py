"""The priors of the comparison, tuned once per posterior: what ``tune_prior`` computes and
``evaluate`` reads.

From one centred posterior (:func:`centre`) and, when there is one, the validation split's
Jacobian features (one pass, every module):

- ``la``: the marginal-likelihood prior (``prior.structure``, ``prior.evidence``);
- ``la_val``: the scalar prior minimising the validation NLL of the linearised predictive
  (:func:`tune_prior_nll`, over the features' cheap covariances at any prior);
- ``llla``: the ``lm_head`` LoRA alone, with the configured method;

and the temperature of the validation split's MAP logits (temperature scaling, Guo et al.
2017), read from the same features. ``prior.method`` names which of ``la`` and ``la_val`` is
the configured posterior. :func:`record` is the prior file's content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from lalora.config import PredictiveConfig, PriorConfig
from lalora.core.metrics import nll
from lalora.core.search import maximise_log10
from lalora.laplace.marglik import warn_edge
from lalora.laplace.posterior import Posterior, last_layer_modules
from lalora.laplace.predictive import JacobianFeatures, Link, logit_covariance, predictive_probs


@dataclass(frozen=True)
class Validation:
    """The validation split's Jacobian features (every module) and labels (N,)."""

    features: JacobianFeatures
    labels: Tensor


@dataclass(frozen=True)
class TunedPriors:
    """Each tuned posterior by method key (``la``; ``la_val`` with a validation split;
    ``llla`` with an ``lm_head`` LoRA), the configured one's key, and the temperature
    ``(T, at_edge)`` (None without a validation split)."""

    posteriors: dict[str, Posterior]
    configured: str
    temperature: tuple[float, str | None] | None

    @property
    def posterior(self) -> Posterior:
        return self.posteriors[self.configured]


def centre(
    post: Posterior, weights: dict[str, Tensor], init: dict[str, Tensor] | None = None
) -> tuple[Posterior, dict]:
    """``post`` centred at the prior mean: zero, or ``init`` (the step-0 adapter, for
    ``prior.mean: init``), from the adapter's LoRA ``weights`` (d_out, d_in) by module; and
    the share of ||theta* - mu||^2 along the LoRA symmetry directions
    (:func:`lalora.laplace.diagnostics.lora_symmetry`)."""
    from lalora.laplace.diagnostics import lora_symmetry

    names = list(post.modules)
    if init is None:
        delta = {n: weights[n].double() for n in names}
    else:
        delta = {n: weights[n].double() - init[n].double() for n in names}
    return post.with_delta(delta), lora_symmetry(weights, delta)


def _marglik(post: Posterior, prior: PriorConfig, where: str) -> Posterior:
    from lalora.laplace.marglik import tune_prior

    return tune_prior(
        post, prior.structure, prior.log10_min, prior.log10_max, prior.grid, where=where,
        accept_edge=True, evidence=prior.evidence,
    )  # fmt: skip


def _val_nll(
    post: Posterior, val: Validation, prior: PriorConfig, pred: PredictiveConfig, where: str
) -> Posterior:
    tuned, _ = tune_prior_nll(
        val.features, val.labels, post, pred.link, pred.samples, pred.seed,
        prior.log10_min, prior.log10_max, prior.grid, where=where,
    )  # fmt: skip
    return tuned


def tune_priors(
    post: Posterior, val: Validation | None, prior: PriorConfig, predictive: PredictiveConfig,
    where: str = "posterior",
) -> TunedPriors:  # fmt: skip
    """Every prior of the comparison for the centred posterior ``post`` (see the module
    docstring); ``val`` None: no validation split (``prior.method val_nll`` then refused)."""
    from lalora.config import ConfigError
    from lalora.models.baselines import fit_temperature

    if prior.method == "val_nll" and val is None:
        raise ConfigError(
            "prior.method val_nll needs a validation split: set data.<dataset>.val_size > 0"
        )
    tuned = {"la": _marglik(post, prior, where)}
    if val is not None:
        tuned["la_val"] = _val_nll(post, val, prior, predictive, where)
    last = last_layer_modules(list(post.modules))
    if last:
        sub = post.restrict(last)
        tuned["llla"] = (
            _marglik(sub, prior, where)
            if prior.method == "marglik"
            else _val_nll(sub, val, prior, predictive, where)
        )
    temperature = None if val is None else fit_temperature(val.features.mean, val.labels)
    configured = "la" if prior.method == "marglik" else "la_val"
    return TunedPriors(tuned, configured, temperature)


def prior_summary(tuned: Posterior, prior: PriorConfig) -> dict:
    """What ``evaluate`` reads of one tuned posterior: the precision (scalar; layerwise: the
    geometric mean over modules) and per module, the edges of the search range it reached, log
    Z, ||theta* - mu||^2, the parameter count and the curvature's penalty shares."""
    from lalora.laplace.diagnostics import penalty_shares
    from lalora.laplace.marglik import edges_of, log_marginal_likelihood

    values = list(tuned.prior_precision.values())
    edges = edges_of(tuned.prior_precision, prior.log10_min, prior.log10_max)
    return {
        "prior_precision": math.exp(sum(math.log(v) for v in values) / len(values)),
        "prior_precision_by_module": tuned.prior_precision,
        "at_edge": sorted(set(edges.values())),
        "modules_at_edge": edges,
        "log_marginal_likelihood": log_marginal_likelihood(tuned, evidence=prior.evidence),
        "theta_sq": tuned.theta_sq,
        "n_params": tuned.n_params,
        "curvature": penalty_shares(tuned).as_dict(),
    }


def record(tuned: TunedPriors, prior: PriorConfig, symmetry: dict) -> dict:
    """The prior file: the configured posterior's :func:`prior_summary` at the top level (with the
    prior's settings, the data size, the training confidence and Fisher trace, the LoRA
    symmetry share), every method's summary under ``methods``, and the temperature."""
    post = tuned.posterior
    T = tuned.temperature
    return {
        "method": prior.method,
        "structure": prior.structure,
        "mean": prior.mean,
        "evidence": prior.evidence,
        "normalisation": post.normalisation,
        **prior_summary(post, prior),
        "n_data": post.n_data,
        "train_confidence": post.train_confidence,
        "fisher_trace": post.fisher_trace,
        "symmetry": symmetry,
        "methods": {k: prior_summary(v, prior) for k, v in tuned.posteriors.items()},
        "temperature": None if T is None else {"T": T[0], "at_edge": T[1]},
    }


def tune_prior_nll(
    features: JacobianFeatures,
    labels: Tensor,
    post: Posterior,
    link: Link | str = Link.PROBIT,
    samples: int = 1000,
    seed: int = 0,
    log10_min: float = -4.0,
    log10_max: float = 6.0,
    grid: int = 41,
    where: str = "posterior",
) -> tuple[Posterior, str | None]:
    """Scalar prior precision minimising the validation NLL of the linearised predictive, and
    ``"low"``/``"high"`` when that minimum lies at an edge of the range.

    An edge is a result, not an error: at the low edge the predictive tends to the uniform
    distribution (the model's answers on the validation split are worse than chance), at the
    high edge to the MAP (the MAP is already as calibrated as the posterior can make it). It is
    returned with a :class:`PriorAtEdgeWarning`.
    """

    def objective(x: float) -> float:
        p = post.with_prior(10.0**x)
        probs = predictive_probs(features.mean, logit_covariance(features, p), link, samples, seed)
        return -nll(probs, labels)

    res = maximise_log10(objective, log10_min, log10_max, grid, where, accept_edge=True)
    if res.at_edge is not None:
        warn_edge(where, res.at_edge, res.log10, "validation NLL")
    return post.with_prior(10.0**res.log10), res.at_edge
