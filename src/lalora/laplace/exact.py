"""The exact full-GGN linearised Laplace over all LoRA weights, in the data space.

A reference for the Kronecker posterior (``kfac.py``): no Kronecker factors, no block-diagonal
approximation, the exact P x P GGN of every LoRA weight, yet no P x P matrix. With N training
examples, K = C - 1 logit contrasts, the contrast Jacobians J (NK, P) and the contrast Hessians
Lambda_n = S_n S_n^T (K, K), the GGN is H = J^T S S^T J with S = blockdiag(S_n) (NK, NK), of
rank <= NK << P. With a diagonal prior precision Lambda_0 (lambda_g on the P_g weights of group
g, a group being one LoRA module), the matrix determinant lemma and Woodbury's identity give:

    log det(H + Lambda_0) = sum_g P_g log lambda_g + log det(I + S^T Kern S),
    Kern = J Lambda_0^-1 J^T = sum_g Gram_g / lambda_g,    Gram_g = J_g J_g^T    (NK, NK),
    J* Sigma J*^T = J* Lambda_0^-1 J*^T - X (I + S^T Kern S)^-1 X^T,   X = J* Lambda_0^-1 J^T S,

the data-space ("dual", "kernel") form of the linearised Laplace (Khan et al. 2019, "Approximate
inference turns deep networks into Gaussian processes"; Immer et al. 2021, "Scalable marginal
likelihood estimation for model selection in deep learning"). log Z and the predictive
covariance at any prior precision then cost O((NK)^3), from Gram matrices built once in
O((NK)^2 P).

``Structure.BLOCK`` drops the GGN's cross-module terms (one exact block per module): the
structure within which KFAC approximates each block by A_m (x) G_m. Comparing KFAC, BLOCK and
FULL on one case separates the Kronecker approximation from the block-diagonal one.

The prior mean may be non-zero (e.g. the LoRA initialisation): only ||theta* - mu||^2 enters
the standard evidence. Two versions of the linearised model's evidence (Antoran et al. 2022):

- ``evidence="linear"`` (as ``marglik.Evidence.LINEAR`` for the Kronecker posterior): the data
  log-likelihood quadratic around theta* with zero gradient, integrated against the prior:
  the penalty lambda ||delta||^2 becomes delta^T (H^-1 + Lambda_0^-1)^-1 delta
  = u^T (I + S^T Kern S)^-1 u with u = S^T J delta (NK,);
- :func:`linear_model_evidence`: the Laplace evidence of the linearised model
  f_lin(theta) = f(theta*) + J (theta - theta*) with the softmax likelihood, at its own mode,
  found by Newton's method in the data space (Rasmussen and Williams 2006, Algorithm 3.1, with
  the prior mean m0 = f(theta*) - J delta and covariance Kern of the training contrasts): no
  quadratic approximation and the data gradient at theta* included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn

from lalora.core.search import maximise_log10
from lalora.laplace.kfac import LogitsFn
from lalora.laplace.predictive import contrast_jacobians


class Structure(StrEnum):
    FULL = "full"
    BLOCK = "block"


@dataclass(frozen=True)
class DualGGN:
    """Everything the exact Laplace needs, for G groups (modules), N train and M test examples.

    ``gram`` (G, NK, NK): J_g J_g^T on the training set; ``root`` (N, K, K): S_n;
    ``test_cross`` (G, MK, NK): J*_g J_g^T; ``test_self`` (G, M, K, K): per-example J*_g J*_g^T;
    ``test_mean`` (M, C) MAP logits; ``theta_sq`` (G,) ||theta*_g - mu_g||^2; ``n_params`` (G,);
    ``shift`` (G, NK): J_g (theta*_g - mu_g); ``train_mean`` (N, C) MAP logits, ``labels`` (N,).
    """

    names: tuple[str, ...]
    n_params: Tensor
    theta_sq: Tensor
    log_likelihood: float
    root: Tensor
    gram: Tensor
    test_mean: Tensor
    test_cross: Tensor
    test_self: Tensor
    shift: Tensor
    train_mean: Tensor
    labels: Tensor
    others: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def centred_at(self, label: str) -> DualGGN:
        """The same Jacobians centred at another prior mean given to :func:`dual_ggn`."""
        theta_sq, shift = self.others[label]
        return self.with_prior_mean_sq(theta_sq, shift)

    def with_prior_mean_sq(self, theta_sq: Tensor, shift: Tensor | None = None) -> DualGGN:
        """The same Jacobians with another ||theta* - mu||^2 per group (G,) (and J_g delta_g,
        (G, NK), for the linearised evidence)."""
        from dataclasses import replace

        out = replace(self, theta_sq=theta_sq.double())
        return out if shift is None else replace(out, shift=shift.double())


def contrast_hessian_root(logits: Tensor) -> Tensor:
    """S (N, K, K) with S S^T = diag(q) - q q^T, q = softmax([d, 0])_{1:K} for the contrasts
    d_c = f_c - f_C: the Hessian of -log softmax w.r.t. the contrasts (label-free)."""
    p = torch.softmax(logits.double(), dim=-1)[:, :-1]  # (N, K)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    evals, evecs = torch.linalg.eigh(lam)
    return evecs * evals.clamp(min=0).sqrt()[:, None, :]


def _test_grams(
    model: nn.Module, test: Sequence[Any], logits_fn: LogitsFn, modules: dict[str, nn.Linear],
    J: dict[str, Tensor], progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The test logits (M, C), the cross Grams J_test,g J_g^T (G, M K, N K) and the self Grams
    J_test,g J_test,g^T per test datum (G, M, K, K), float64, from the training Jacobians J
    (NK, P_g) by module."""
    names = tuple(modules)
    means, cross, selfs = [], {n: [] for n in names}, {n: [] for n in names}
    for mean, jac in contrast_jacobians(model, test, logits_fn, modules, progress, len(test)):
        means.append(mean)
        for n in names:
            Jt = jac[n].double().flatten(2)  # (B, K, P_g)
            cross[n].append(Jt.flatten(0, 1) @ J[n].T)  # (B K, NK)
            selfs[n].append(Jt @ Jt.transpose(1, 2))  # (B, K, K)
    return (
        torch.cat(means),
        torch.stack([torch.cat(cross[n]) for n in names]),
        torch.stack([torch.cat(selfs[n]) for n in names]),
    )


def _centred(
    modules: dict[str, nn.Linear], J: dict[str, Tensor], mean: dict[str, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """||theta_g - mu_g||^2 per module (G,) and J_g (theta_g - mu_g) (G, NK); ``mean`` None is
    the zero mean."""
    sq, sh = [], []
    for n, mod in modules.items():
        w = mod.weight.detach().double()
        if mean is not None:
            w = w - mean[n].double()
        sq.append(float(w.pow(2).sum()))
        sh.append(J[n] @ w.flatten())  # (NK,)
    return torch.tensor(sq, dtype=torch.float64), torch.stack(sh)


def dual_ggn(
    model: nn.Module,
    train: Sequence[Any],
    test: Sequence[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    prior_mean: dict[str, Tensor] | None = None,
    progress: bool = False,
    other_means: dict[str, dict[str, Tensor]] | None = None,
) -> DualGGN:
    """Gram matrices of the exact per-example contrast Jacobians (float64).

    Args:
        train, test: batches with ``labels`` (B,) (and ``attention_mask``, as for ``fit_kfac``).
        prior_mean: weights mu_g by module name (default zero).
        other_means: more prior means by label, for :meth:`DualGGN.centred_at`.

    Memory: the training Jacobians, N K P float64 values, are held once.
    """
    names = tuple(modules)
    rows: dict[str, list[Tensor]] = {n: [] for n in names}
    logits_train = []
    for logits, jac in contrast_jacobians(model, train, logits_fn, modules, progress, len(train)):
        logits_train.append(logits)
        for n in names:
            rows[n].append(jac[n].double().flatten(2).flatten(0, 1))  # (B K, P_g)
    J = {n: torch.cat(rows.pop(n)) for n in names}  # (NK, P_g)
    gram = torch.stack([J[n] @ J[n].T for n in names])  # (G, NK, NK)
    logits = torch.cat(logits_train)  # (N, C)
    labels = torch.cat([b.labels for b in train])
    log_lik = float(torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum())
    test_mean, test_cross, test_self = _test_grams(model, test, logits_fn, modules, J, progress)

    def centred(mean: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        return _centred(modules, J, mean)

    theta_sq, shift = centred(prior_mean)
    others = {k: centred(v) for k, v in (other_means or {}).items()}
    return DualGGN(
        names=names,
        n_params=torch.tensor([modules[n].weight.numel() for n in names], dtype=torch.float64),
        theta_sq=theta_sq,
        log_likelihood=log_lik,
        root=contrast_hessian_root(logits),
        gram=gram,
        test_mean=test_mean,
        test_cross=test_cross,
        test_self=test_self,
        shift=shift,
        train_mean=logits,
        labels=labels,
        others=others,
    )


def _precisions(dual: DualGGN, prior: float | dict[str, float] | Tensor) -> Tensor:
    if isinstance(prior, dict):
        lam = torch.tensor([float(prior[n]) for n in dual.names], dtype=torch.float64)
    elif isinstance(prior, Tensor):
        lam = prior.double()
    else:
        lam = torch.full((len(dual.names),), float(prior), dtype=torch.float64)
    if not bool((lam > 0).all()):
        raise ValueError("prior precision must be positive")
    return lam


def _right(X: Tensor, root: Tensor) -> Tensor:
    """X S for the block-diagonal S = blockdiag(root) (N K, N K): X (..., NK) -> (..., NK),
    in O(N K^2) per row instead of a dense (NK, NK) product."""
    N, K, _ = root.shape
    Xr = X.reshape(*X.shape[:-1], N, K)
    return torch.einsum("...nk,nkb->...nb", Xr, root).reshape(X.shape)


def _sandwich(X: Tensor, root: Tensor) -> Tensor:
    """S^T X S for X (..., NK, NK)."""
    return _right(_right(X, root).transpose(-1, -2), root).transpose(-1, -2)


def _inner(dual: DualGGN, lam: Tensor, structure: Structure) -> Tensor:
    """I + S^T Kern S: (NK, NK) for FULL, (G, NK, NK) per group for BLOCK."""
    eye = torch.eye(dual.gram.shape[-1], dtype=dual.gram.dtype)
    if structure is Structure.FULL:
        kern = torch.einsum("gij,g->ij", dual.gram, 1.0 / lam)
        return eye + _sandwich(kern, dual.root)
    return eye + _sandwich(dual.gram / lam[:, None, None], dual.root)


def log_marginal_likelihood(
    dual: DualGGN,
    prior: float | dict[str, float] | Tensor,
    structure: Structure | str = Structure.FULL,
    evidence: str = "standard",
) -> float:
    """log Z = log p(D | theta*) - 1/2 sum_g lambda_g ||theta*_g - mu_g||^2
    + 1/2 log det Lambda_0 - 1/2 log det(H + Lambda_0), exactly (method.md section 4); with
    ``evidence="linear"`` the penalty is delta^T (H^-1 + Lambda_0^-1)^-1 delta instead."""
    structure = Structure(structure)
    lam = _precisions(dual, prior)
    inner = _inner(dual, lam, structure)
    L = torch.linalg.cholesky(inner)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum()
    if evidence == "standard":
        penalty = float((lam * dual.theta_sq).sum())
    elif evidence == "linear":
        shift = dual.shift.sum(0) if structure is Structure.FULL else dual.shift  # (NK,) | (G, NK)
        u = _right(shift, dual.root)
        y = torch.linalg.solve_triangular(L, u[..., None], upper=False)
        penalty = float(y.pow(2).sum())
    else:
        raise ValueError(f"unknown evidence {evidence!r} (standard or linear)")
    return dual.log_likelihood - 0.5 * penalty - 0.5 * float(logdet)


def _contrasts(logits: Tensor) -> Tensor:
    """(N, C) logits -> (N, K) contrasts f_c - f_C."""
    return (logits[:, :-1] - logits[:, -1:]).double()


def _contrast_loglik(d: Tensor, labels: Tensor) -> tuple[float, Tensor, Tensor]:
    """log p(y | d), its gradient (N, K) and the root S (N, K, K) of its negative Hessian."""
    full = torch.cat([d, torch.zeros_like(d[:, :1])], dim=1)  # (N, C)
    logp = torch.log_softmax(full, -1)
    onehot = torch.nn.functional.one_hot(labels, full.shape[1]).double()
    grad = (onehot - logp.exp())[:, :-1]
    return float(logp.gather(1, labels[:, None]).sum()), grad, contrast_hessian_root(full)


@dataclass(frozen=True)
class LinearMode:
    """The linearised model's Laplace evidence at its own mode: ``log_z``; the mode's data
    log-likelihood ``log_likelihood`` and prior penalty ``penalty`` = ||theta_lin - mu||^2 in
    the prior's metric; ``iterations`` of Newton's method."""

    log_z: float
    log_likelihood: float
    penalty: float
    iterations: int


def linear_model_evidence(
    dual: DualGGN, prior: float | dict[str, float] | Tensor, tol: float = 1e-10, max_iter: int = 200
) -> LinearMode:
    """Evidence of the linearised model with the softmax likelihood at its mode (full GGN).

    Newton's method on a, with theta_lin - mu = Lambda_0^-1 J^T a and training contrasts
    m0 + Kern a (Rasmussen and Williams 2006, Algorithm 3.1), halving steps that do not raise
    Psi(a) = log p(y | m0 + Kern a) - 1/2 a^T Kern a; then
    log Z = Psi(a_hat) - 1/2 log det(I + S^T Kern S) at the mode.
    """
    lam = _precisions(dual, prior)
    kern = torch.einsum("gij,g->ij", dual.gram, 1.0 / lam)  # (NK, NK)
    N, K = dual.root.shape[:2]
    m0 = _contrasts(dual.train_mean).flatten() - dual.shift.sum(0)  # (NK,)
    eye = torch.eye(N * K, dtype=torch.float64)

    def psi(a: Tensor) -> tuple[float, float, float]:
        f = kern @ a
        ll = _contrast_loglik((m0 + f).reshape(N, K), dual.labels)[0]
        pen = float(a @ f)
        return ll - 0.5 * pen, ll, pen

    a = torch.zeros(N * K, dtype=torch.float64)
    value = psi(a)[0]
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        f = kern @ a
        _, grad, root = _contrast_loglik((m0 + f).reshape(N, K), dual.labels)
        b = _wf(root, f) + grad.flatten()  # W f + grad log p
        B = eye + _sandwich(kern, root)
        rhs = _right(kern @ b, root)  # S^T Kern b
        step_a = b - _left(root, torch.linalg.solve(B, rhs)) - a  # Newton's a minus the current
        t, new = 1.0, None
        while t > 1e-10:
            trial = psi(a + t * step_a)
            if trial[0] >= value - 1e-12:
                new = trial
                break
            t /= 2
        if new is None:
            break
        a = a + t * step_a
        done = new[0] - value < tol * max(1.0, abs(value))
        value = new[0]
        if done:
            break
    _, ll, pen = psi(a)
    root = _contrast_loglik((m0 + kern @ a).reshape(N, K), dual.labels)[2]
    L = torch.linalg.cholesky(eye + _sandwich(kern, root))
    logdet = 2 * float(torch.log(torch.diagonal(L)).sum())
    return LinearMode(log_z=ll - 0.5 * pen - 0.5 * logdet, log_likelihood=ll, penalty=pen,
                      iterations=iterations)  # fmt: skip


def _wf(root: Tensor, f: Tensor) -> Tensor:
    """W f for W = S S^T block-diagonal: f (NK,) -> (NK,)."""
    return _left(root, _right(f, root))


def _left(root: Tensor, x: Tensor) -> Tensor:
    """S x for the block-diagonal S (NK, NK): x (NK,) -> (NK,)."""
    N, K, _ = root.shape
    return torch.einsum("nkb,nb->nk", root, x.reshape(N, K)).reshape(-1)


def logit_covariance(
    dual: DualGGN,
    prior: float | dict[str, float] | Tensor,
    structure: Structure | str = Structure.FULL,
) -> Tensor:
    """Exact covariance (M, K, K) of the test contrasts under the linearised Laplace."""
    structure = Structure(structure)
    lam = _precisions(dual, prior)
    M, K = dual.test_self.shape[1], dual.test_self.shape[2]
    prior_part = torch.einsum("gmkl,g->mkl", dual.test_self, 1.0 / lam)
    inner = _inner(dual, lam, structure)
    L = torch.linalg.cholesky(inner)
    if structure is Structure.FULL:
        X = _right(torch.einsum("gij,g->ij", dual.test_cross, 1.0 / lam), dual.root)  # (MK, NK)
        Y = torch.linalg.solve_triangular(L, X.T, upper=False)  # (NK, MK)
        Y = Y.T.reshape(M, K, -1)
        corr = torch.einsum("mkj,mlj->mkl", Y, Y)
    else:
        X = _right(dual.test_cross / lam[:, None, None], dual.root)  # (G, MK, NK)
        Y = torch.linalg.solve_triangular(L, X.transpose(1, 2), upper=False)  # (G, NK, MK)
        Y = Y.transpose(1, 2).reshape(-1, M, K, Y.shape[1])
        corr = torch.einsum("gmkj,gmlj->mkl", Y, Y)
    cov = prior_part - corr
    return (cov + cov.transpose(1, 2)) / 2


def tune_prior(
    dual: DualGGN,
    structure: Structure | str = Structure.FULL,
    log10_min: float = -4.0,
    log10_max: float = 6.0,
    grid: int = 41,
    where: str = "exact posterior",
    evidence: str = "standard",
    accept_edge: bool = False,
) -> float:
    """The scalar prior precision maximising the exact log Z (grid + golden section):
    ``evidence`` ``standard``, ``linear`` (quadratic at theta*) or ``linear_mode``
    (:func:`linear_model_evidence`, full structure only)."""
    if evidence == "linear_mode":
        if Structure(structure) is not Structure.FULL:
            raise ValueError("the linearised model's mode is defined for the full GGN only")

        def objective(x: float) -> float:
            return linear_model_evidence(dual, 10.0**x).log_z
    else:

        def objective(x: float) -> float:
            return log_marginal_likelihood(dual, 10.0**x, structure, evidence)

    res = maximise_log10(objective, log10_min, log10_max, grid, where, accept_edge)
    return 10.0**res.log10


def effective_dimension(
    dual: DualGGN, prior: float | Tensor, structure: Structure | str = Structure.FULL
) -> float:
    """gamma = sum_i h_i / (h_i + lambda) for a scalar prior: the number of weights the data
    determine. At the marglik optimum with a scalar prior, lambda = gamma / ||theta* - mu||^2
    (MacKay 1992)."""
    structure = Structure(structure)
    lam = float(_precisions(dual, prior)[0])
    if structure is Structure.FULL:
        h = torch.linalg.eigvalsh(_sandwich(dual.gram.sum(0), dual.root))
    else:
        h = torch.linalg.eigvalsh(_sandwich(dual.gram, dual.root)).flatten()
    h = h.clamp(min=0)
    return float((h / (h + lam)).sum())
