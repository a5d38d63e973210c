"""Linearised-Laplace log marginal likelihood and prior-precision tuning (method.md section 4).

    log Z(lambda) = log p(D | theta*) - lambda/2 ||theta*||^2 + P/2 log lambda
                    - 1/2 log det(H + lambda I),

with H block-diagonal over modules, H_m = A_m (x) G_m. With eigenvalues a_i of A_m and g_j of G_m,
log det(H_m + lambda I) = sum_ij log(a_i g_j + lambda) + (P_m - k_a k_g) log lambda, so each
module contributes -lambda/2 ||theta_m||^2 - 1/2 sum_ij log(1 + a_i g_j / lambda): no P x P matrix.
The module terms are separable, so a layer-wise prior is tuned module by module.

``evidence: linear`` is the evidence of the linearised model at its own mode (Antoran et al.
2022, "Adapting the linearised Laplace model evidence for modern deep learning"; Immer et al.
2021): with the data log-likelihood quadratic around theta* (its gradient there taken as zero:
the fine-tune has no weight decay), integrating it against N(mu, 1/lambda) gives, with
delta = theta* - mu in the Kronecker eigenbasis (coordinates c_ij, eigenvalues h_ij = a_i g_j),

    log Z_lin(lambda) = log p(D | theta*) - 1/2 sum_ij lambda h_ij / (h_ij + lambda) c_ij^2
                        - 1/2 sum_ij log(1 + h_ij / lambda):

the prior penalises delta only where the data constrain it (h >> lambda); in the directions the
curvature does not reach (h = 0, the kept ranks' complement included) the penalty is zero instead
of lambda c^2. The mode of that model, (H + lambda)^-1 (H theta* + lambda mu), is where the
standard formula would be evaluated.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch
from torch import Tensor

from lalora.core.search import maximise_log10
from lalora.laplace.posterior import ModuleFactors, Posterior


class PriorStructure(StrEnum):
    SCALAR = "scalar"
    LAYERWISE = "layerwise"


class Evidence(StrEnum):
    STANDARD = "standard"
    LINEAR = "linear"


class PriorAtEdgeWarning(UserWarning):
    """A tuned prior precision sits at an edge of its search range (accepted as a result)."""


def warn_edge(where: str, edge: str, log10_precision: float, objective: str) -> None:
    """Warn that ``objective`` is best at the ``edge`` ("low"/"high") of the prior range."""
    import warnings

    meaning = (
        "the posterior is as wide as the range allows"
        if edge == "low"
        else "the predictive is the MAP's"
    )
    warnings.warn(
        f"{where}: the {objective} is best at the {edge} edge of the prior range "
        f"(lambda = 1e{log10_precision:g}: {meaning}); recorded as such",
        PriorAtEdgeWarning,
        stacklevel=3,
    )


def squared_distances(weights: dict[str, Tensor], mean: dict[str, Tensor]) -> dict[str, float]:
    """||theta_m - mu_m||^2 per module: the prior term of log Z for a prior centred at ``mean``
    (e.g. the LoRA initialisation, the step-0 adapter)."""
    missing = set(weights) - set(mean)
    if missing:
        raise ValueError(f"prior mean missing for modules {sorted(missing)[:3]}")
    return {n: float((w.double() - mean[n].double()).pow(2).sum()) for n, w in weights.items()}


def module_evidence(
    m: ModuleFactors, prior_precision: float, evidence: Evidence | str = Evidence.STANDARD
) -> float:
    """The lambda-dependent part of log Z for one module (stable form)."""
    ag = torch.outer(m.a.evals, m.g.evals)  # (k_a, k_g)
    log_det = 0.5 * float(torch.log1p(ag / prior_precision).sum())
    if Evidence(evidence) is Evidence.STANDARD:
        return -0.5 * prior_precision * m.theta_sq - log_det
    if m.delta is None:
        raise ValueError(
            "the linearised evidence needs theta* - mu in the eigenbasis: Posterior.with_delta"
        )
    penalty = float((ag * prior_precision / (ag + prior_precision) * m.delta.pow(2)).sum())
    return -0.5 * penalty - log_det


def log_marginal_likelihood(
    post: Posterior,
    prior_precision: float | dict[str, float] | None = None,
    evidence: Evidence | str = Evidence.STANDARD,
) -> float:
    """log Z of ``post`` at its prior precision (or the one given: scalar or per module)."""
    if prior_precision is not None:
        post = post.with_prior(prior_precision)
    if not post.prior_precision:
        raise ValueError("no prior precision: pass one or tune it first")
    return post.log_likelihood + sum(
        module_evidence(m, post.prior_precision[n], evidence) for n, m in post.modules.items()
    )


def tune_prior(
    post: Posterior,
    structure: PriorStructure | str = PriorStructure.SCALAR,
    log10_min: float = -4.0,
    log10_max: float = 6.0,
    grid: int = 41,
    where: str = "posterior",
    accept_edge: bool = False,
    evidence: Evidence | str = Evidence.STANDARD,
) -> Posterior:
    """Maximise log Z over log lambda (scalar, or per module for ``layerwise``), by the
    ``standard`` evidence or the ``linear`` one (which needs :meth:`Posterior.with_delta`).

    An optimum at an edge of the range raises :class:`lalora.core.search.SearchError`, or with
    ``accept_edge`` is kept with a :class:`PriorAtEdgeWarning` (e.g. the step-0 adapter under a
    prior centred at the LoRA initialisation: theta* = mu, so log Z grows without bound in
    lambda, and the posterior is the MAP).
    """
    structure = PriorStructure(structure)
    if structure is PriorStructure.SCALAR:

        def objective(x: float) -> float:
            lam = 10.0**x
            return sum(module_evidence(m, lam, evidence) for m in post.modules.values())

        res = maximise_log10(objective, log10_min, log10_max, grid, where, accept_edge)
        if res.at_edge:
            warn_edge(where, res.at_edge, res.log10, "marginal likelihood")
        return post.with_prior(10.0**res.log10)
    prior = {}
    for name, m in post.modules.items():
        res = maximise_log10(
            lambda x, m=m: module_evidence(m, 10.0**x, evidence),
            log10_min,
            log10_max,
            grid,
            f"{where}, module {name}",
            accept_edge,
        )
        prior[name] = 10.0**res.log10
    edges = list(edges_of(prior, log10_min, log10_max).values())
    for edge in sorted(set(edges)):
        bound = log10_min if edge == "low" else log10_max
        warn_edge(f"{where} ({edges.count(edge)} modules)", edge, bound, "marginal likelihood")
    return post.with_prior(prior)


def edges_of(prior: dict[str, float], log10_min: float, log10_max: float) -> dict[str, str]:
    """The modules whose prior precision sits at an edge of the range: name -> low | high."""
    out = {}
    for name, v in prior.items():
        x = math.log10(v)
        if x <= log10_min + 1e-9:
            out[name] = "low"
        elif x >= log10_max - 1e-9:
            out[name] = "high"
    return out
