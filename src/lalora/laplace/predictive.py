"""Linearised Laplace predictive over the answer logits (method.md section 5).

f(x) ~ N(f(x; theta*), J Sigma J^T). Softmax ignores a common shift, so only the K = C - 1
contrasts d_c = f_c - f_C matter: d ~ N(D mu, D J Sigma J^T D^T). The contrast Jacobians D J need
one forward and K backward passes per batch; per example and module the Jacobian of contrast c is
the matrix J_c = sum_t g_{t,c} a_t^T (d_out, d_in), read from per-example (not batch-summed)
activations and output gradients. With A = Q_A diag(a) Q_A^T, G = Q_G diag(g) Q_G^T and
Sigma_m = (A (x) G + lambda I)^-1:

    cov(c, c') = 1/lambda (<J_c, J_c'>_F - <P_c, P_c'>_F)
                 + sum_ij (P_c)_ji (P_c')_ji / (a_i g_j + lambda),     P_c = Q_G^T J_c Q_A,

the first term being the part of J outside the kept eigenspaces (zero when both sides are dense:
no cancellation at small lambda). :func:`jacobian_features` stores it (K, K) and P (K, k_g, k_a)
per example and module, so the covariance at any prior precision is cheap
(:func:`logit_covariance`): validation-NLL tuning reuses one pass. :func:`predict_covariance`
computes the covariance at one prior batch by batch, keeping nothing of size P per example.

P_c is formed one of two ways per module, whichever takes fewer multiplications (both exact):
from J_c, T d_out d_in + d_out d_in k_a + d_out k_a k_g; or from the token factors,
P_c = sum_t (Q_G^T g_{t,c}) (Q_A^T a_t)^T, T (d_out k_g + d_in k_a + k_g k_a). The second wins
where T is small against the sides, above all for ``lm_head``, which reads one position (T = 1)
and whose output side is the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora.core.errors import NonFiniteError
from lalora.laplace.hooks import Tap, lora_grad_enabled, output_gradients
from lalora.laplace.kfac import LogitsFn
from lalora.laplace.posterior import ModuleFactors, Posterior
from lalora.runtime.distributed import SINGLE, Dist, cat_or_none, gather_cat, shard


class Link(StrEnum):
    MC = "mc"
    PROBIT = "probit"


@dataclass(frozen=True)
class JacobianFeatures:
    """``mean`` (N, C) MAP logits; per module ``perp`` (N, K, K) and ``proj`` (N, K, k_g, k_a)
    (see :func:`_project`), float64."""

    mean: Tensor
    perp: dict[str, Tensor]
    proj: dict[str, Tensor]


def contrast_matrix(C: int) -> Tensor:
    """D (K, C) with rows e_c - e_C, K = C - 1."""
    return torch.cat([torch.eye(C - 1), -torch.ones(C - 1, 1)], dim=1).double()


@dataclass(frozen=True)
class TokenFactors:
    """A module's per-example contrast Jacobians kept as their token factors,
    J_c = sum_t g_{t,c} a_t^T: ``g`` (B, K, T, d_out) output gradients, ``a`` (B, T, d_in) inputs
    (zero at padding)."""

    g: Tensor
    a: Tensor

    def dense(self) -> Tensor:
        """The Jacobians (B, K, d_out, d_in)."""
        return torch.einsum("bkto,bti->bkoi", self.g, self.a)


# a module's route: True to keep its Jacobians as token factors, given its name and T
Route = Callable[[str, int], bool]


def contrast_jacobians(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    progress: bool = False,
    total: int | None = None,
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Per batch, the MAP logits (B, C) in float64 and, per module, the per-example Jacobians
    of the K = C - 1 logit contrasts, (B, K, d_out, d_in) in the model's dtype (float32 for
    half-precision models): one forward and K backward passes.
    """
    yield from _contrast_pass(model, batches, logits_fn, modules, _never, progress, total)


def _never(name: str, T: int) -> bool:
    return False


def _contrast_pass(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    tokens: Route,
    progress: bool = False,
    total: int | None = None,
) -> Iterator[tuple[Tensor, dict[str, Tensor | TokenFactors]]]:
    """As :func:`contrast_jacobians`, with the modules for which ``tokens(name, T)`` holds
    returned as :class:`TokenFactors` instead of dense Jacobians."""
    jac: dict[str, list[Tensor]] = {n: [] for n in modules}
    inputs: dict[str, Tensor] = {}

    def on_grad(name: str, a: Tensor, g: Tensor) -> None:
        dtype = torch.promote_types(torch.promote_types(g.dtype, a.dtype), torch.float32)
        if tokens(name, a.shape[1]):
            inputs[name] = a.to(dtype)
            jac[name].append(g.to(dtype))  # (B, T, d_out)
        else:
            # per-example Jacobian of one contrast: sum_t g_t a_t^T, (B, d_out, d_in)
            jac[name].append(torch.bmm(g.to(dtype).transpose(1, 2), a.to(dtype)))

    was_training = model.training
    model.eval()
    try:
        with lora_grad_enabled(modules), Tap(modules, on_grad, mask_grads=False) as tap:
            for b, batch in enumerate(
                tqdm(batches, desc="jacobians", disable=not progress, total=total)
            ):
                tap.mask = getattr(batch, "attention_mask", None)
                logits = logits_fn(model, batch)  # (B, C)
                if not torch.isfinite(logits).all():
                    raise NonFiniteError(f"non-finite logits in batch {b}")
                B, C = logits.shape
                D = contrast_matrix(C).to(logits.device)  # (K, C)
                vectors = D.T[None].expand(B, C, C - 1)  # (B, C, K): column k is e_k - e_C
                output_gradients(logits, vectors, tap.outputs)
                out: dict[str, Tensor | TokenFactors] = {}
                for name in modules:
                    parts = jac[name]
                    stacked = parts[0][:, None] if len(parts) == 1 else torch.stack(parts, 1)
                    out[name] = (
                        TokenFactors(stacked, inputs.pop(name)) if name in inputs else stacked
                    )
                    jac[name].clear()
                yield logits.detach().double().cpu(), out
    finally:
        model.train(was_training)


def token_route(post: Posterior | Iterable[Posterior]) -> Route:
    """The cheaper way to form each module's projections P_c (module docstring): token
    factors when T (d_out k_g + d_in k_a + k_g k_a) (plus T^2 (d_out + d_in) for the part
    outside low-rank eigenspaces) is below the cost through J_c. With several posteriors the
    first holding a module decides."""
    factors: dict[str, ModuleFactors] = {}
    for p in [post] if isinstance(post, Posterior) else post:
        for name, m in p.modules.items():
            factors.setdefault(name, m)

    def route(name: str, T: int) -> bool:
        m = factors[name]
        d_out, d_in, k_g, k_a = m.g.dim, m.a.dim, m.g.rank, m.a.rank
        via_tokens = T * (d_out * k_g + d_in * k_a + k_g * k_a)
        via_j = T * d_out * d_in + d_out * d_in * k_a + d_out * k_a * k_g
        if k_g < d_out or k_a < d_in:
            via_tokens += T * T * (d_out + d_in)
            via_j += d_out * d_in
        return via_tokens < via_j

    return route


def jacobian_features(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    post: Posterior,
    progress: bool = False,
    total: int | None = None,
    dist: Dist | None = None,
) -> JacobianFeatures:
    """One forward and C - 1 backward passes per batch; see the module docstring. With
    ``dist`` each rank computes its contiguous share of ``batches`` and every rank returns the
    features of all of them, in order."""
    d = dist or SINGLE
    if d.active:
        batches, total = shard(list(batches), d, allow_empty=True), None
    means: list[Tensor] = []
    groups: dict[tuple[str, ...], list[_Group]] = {}
    perp: dict[str, list[Tensor]] = {n: [] for n in modules}
    proj: dict[str, list[Tensor]] = {n: [] for n in modules}
    passes = _contrast_pass(model, batches, logits_fn, modules, token_route(post), progress, total)
    for logits, jac in passes:
        means.append(logits)
        routes = _routes(jac)
        if routes not in groups:
            groups[routes] = _groups(post, jac)
        for group in groups[routes]:
            p, q = _project(group, jac)
            p, q = p.cpu(), q.cpu()  # kept for the whole split: in host memory
            for i, name in enumerate(group.names):
                perp[name].append(p[i])
                proj[name].append(q[i])
    return JacobianFeatures(
        mean=gather_cat(cat_or_none(means), d),
        perp={n: gather_cat(cat_or_none(v), d) for n, v in perp.items()},
        proj={n: gather_cat(cat_or_none(v), d) for n, v in proj.items()},
    )


@dataclass(frozen=True)
class _Group:
    """Modules whose projections run as one batched product: same (d_out, d_in), same kept
    ranks (k_g, k_a), both sides dense or not, and the same route (``tokens``: from token
    factors). ``share`` consecutive modules share one input factor (the q_proj and v_proj
    LoRA-A maps of a layer), so ``qa`` (M / share, d_in, k_a) holds each basis once and each
    is applied to all their Jacobians in one product; ``qg`` (M, d_out, k_g) in the
    Jacobians' dtype; ``ea`` (M, k_a), ``eg`` (M, k_g) float64."""

    names: tuple[str, ...]
    qa: Tensor
    qg: Tensor
    ea: Tensor
    eg: Tensor
    dense: bool
    tokens: bool
    share: int = 1


def _sides(J: Tensor | TokenFactors) -> tuple[tuple[int, int], torch.dtype, bool]:
    if isinstance(J, TokenFactors):
        return (J.g.shape[-1], J.a.shape[-1]), J.g.dtype, True
    return tuple(J.shape[-2:]), J.dtype, False


def _device(J: Tensor | TokenFactors) -> torch.device:
    return J.g.device if isinstance(J, TokenFactors) else J.device


def _routes(jac: dict[str, Tensor | TokenFactors]) -> tuple[str, ...]:
    """The modules of one batch taken through token factors (the route may change with T)."""
    return tuple(n for n, J in jac.items() if isinstance(J, TokenFactors))


def _groups(post: Posterior, jac: dict[str, Tensor | TokenFactors]) -> list[_Group]:
    """Group the modules of one batch's Jacobians ``jac`` (name -> (B, K, d_out, d_in) or
    :class:`TokenFactors`); the bases are converted, moved to the Jacobians' device and
    stacked once per pass."""
    keys: dict[tuple, list[str]] = {}
    device = _device(next(iter(jac.values())))
    for name, J in jac.items():
        m = post.modules[name]
        sides, dtype, tokens = _sides(J)
        if (m.g.dim, m.a.dim) != sides:
            raise ValueError(
                f"{name}: Jacobian {sides} does not match the posterior's factors "
                f"({m.g.dim}, {m.a.dim}); was the posterior fitted on this adapter?"
            )
        dense = m.a.rank == m.a.dim and m.g.rank == m.g.dim
        keys.setdefault((sides, m.g.rank, m.a.rank, dense, dtype, tokens), []).append(name)
    bases: dict[tuple[int, torch.dtype], Tensor] = {}  # factors shared by modules, converted once

    def basis(f, dtype: torch.dtype) -> Tensor:
        key = (id(f), dtype)
        if key not in bases:
            bases[key] = f.evecs.to(device, dtype)
        return bases[key]

    out = []
    for (_, _, _, dense, dtype, tokens), names in keys.items():
        for share, shared in _by_input_factor(post, names, tokens).items():
            ms = [post.modules[n] for n in shared]
            out.append(
                _Group(
                    names=tuple(shared),
                    qa=torch.stack([basis(m.a, dtype) for m in ms[::share]]),
                    qg=torch.stack([basis(m.g, dtype) for m in ms]),
                    ea=torch.stack([m.a.evals for m in ms]).to(device, torch.float64),
                    eg=torch.stack([m.g.evals for m in ms]).to(device, torch.float64),
                    dense=dense,
                    tokens=tokens,
                    share=share,
                )
            )
    return out


def _by_input_factor(post: Posterior, names: list[str], tokens: bool) -> dict[int, list[str]]:
    """``names`` split by how many of them share each input factor (one when ``tokens``), each
    part ordered so that modules sharing a factor are consecutive."""
    if tokens:
        return {1: names}
    owners: dict[int, list[str]] = {}
    for n in names:
        owners.setdefault(id(post.modules[n].a), []).append(n)
    out: dict[int, list[str]] = {}
    for shared in owners.values():
        out.setdefault(len(shared), []).extend(shared)
    return out


def _project(group: _Group, jac: dict[str, Tensor | TokenFactors]) -> tuple[Tensor, Tensor]:
    """For the group's per-example contrast Jacobians per module: the projections
    P_c = Q_G^T J_c Q_A, (M, B, K, k_g, k_a), computed in the Jacobians' dtype (the costly
    product, batched over the M modules), and the part of <J_c, J_c'>_F outside the kept
    eigenspaces, (M, B, K, K), exactly zero when both sides are dense (complete eigenbases);
    both returned in float64."""
    if group.tokens:
        return _project_tokens(group, [jac[n] for n in group.names])
    names = group.names
    J = jac[names[0]][None] if len(names) == 1 else torch.stack([jac[n] for n in names])
    # J (M, B, K, d_out, d_in)
    M, B, K, d_out, d_in = J.shape
    U, k_a, k_g = group.qa.shape[0], group.qa.shape[-1], group.qg.shape[-1]
    if d_out * k_g <= d_in * k_a:  # the small side first, its basis broadcast over examples
        Y = group.qg.mT[:, None] @ J.reshape(M, B * K, d_out, d_in)  # (M, B K, k_g, d_in)
        proj = (Y.reshape(U, -1, d_in) @ group.qa).reshape(M, B, K, k_g, k_a).double()
    else:
        X = J.reshape(U, -1, d_in) @ group.qa  # (U, share B K d_out, k_a)
        X = X.reshape(M, B * K, d_out, k_a).transpose(-1, -2).reshape(M, B * K * k_a, d_out)
        proj = (X @ group.qg).reshape(M, B, K, k_a, k_g).transpose(-1, -2).double()
    if group.dense:
        perp = proj.new_zeros(M, B, K, K)
    else:
        Jd = J.reshape(M * B, K, d_out * d_in).double()
        Pd = proj.reshape(M * B, K, k_g * k_a)
        perp = (Jd @ Jd.transpose(1, 2) - Pd @ Pd.transpose(1, 2)).reshape(M, B, K, K)
    return perp, proj


def _project_tokens(group: _Group, factors: list[TokenFactors]) -> tuple[Tensor, Tensor]:
    """:func:`_project` from token factors: P_c = sum_t (Q_G^T g_{t,c}) (Q_A^T a_t)^T and
    <J_c, J_c'>_F = sum_{t,s} (g_{t,c} . g_{s,c'}) (a_t . a_s), never forming J."""
    G = torch.stack([f.g for f in factors])  # (M, B, K, T, d_out)
    A = torch.stack([f.a for f in factors])  # (M, B, T, d_in)
    M, B, K, T, d_out = G.shape
    d_in, k_a, k_g = A.shape[-1], group.qa.shape[-1], group.qg.shape[-1]
    gq = (G.reshape(M, B * K * T, d_out) @ group.qg).reshape(M, B, K, T, k_g)
    aq = (A.reshape(M, B * T, d_in) @ group.qa).reshape(M, B, T, k_a)
    proj = torch.einsum("mbktg,mbta->mbkga", gq, aq).double()
    if group.dense:
        return proj.new_zeros(M, B, K, K), proj
    Gd, Ad = G.double(), A.double()
    gg = torch.einsum("mbkto,mbjso->mbkjts", Gd, Gd)  # (M, B, K, K, T, T)
    jj = torch.einsum("mbkjts,mbts->mbkj", gg, Ad @ Ad.transpose(-1, -2))
    Pd = proj.reshape(M, B, K, k_g * k_a)
    return jj - Pd @ Pd.transpose(-1, -2), proj


def _weights(ea: Tensor, eg: Tensor, lam: Tensor) -> Tensor:
    """1 / (a_i g_j + lambda_m), (M, k_g, k_a), from ``ea`` (M, k_a), ``eg`` (M, k_g) and
    ``lam`` (M,)."""
    return 1.0 / (eg[:, :, None] * ea[:, None, :] + lam[:, None, None])


def _covariance(perp: Tensor, proj: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """Summed over the M modules of a group: perp_m / lambda_m + sum_ij P_ij P'_ij w_ij,
    (N, K, K); ``perp`` (M, N, K, K), ``proj`` (M, N, K, k_g, k_a), ``w`` (M, k_g, k_a) from
    :func:`_weights`, ``lam`` (M,)."""
    M, N, K = perp.shape[:3]
    P = proj.reshape(M, N, K, -1)
    quad = ((P * w.reshape(M, 1, 1, -1)) @ P.transpose(-1, -2)).sum(0)  # batched over (m, n)
    return quad + (perp / lam[:, None, None, None]).sum(0)


def _with_weights(post: Posterior, group: _Group) -> tuple[_Group, Tensor, Tensor]:
    """The group with its weights (:func:`_weights`) and prior precisions (M,) under ``post``."""
    lam = _lams(post, group.names).to(group.ea.device)
    return group, _weights(group.ea, group.eg, lam), lam


def _lams(post: Posterior, names: tuple[str, ...]) -> Tensor:
    return torch.tensor([post.prior_precision[n] for n in names], dtype=torch.float64)


def rebase_features(features: JacobianFeatures, old: Posterior, new: Posterior) -> JacobianFeatures:
    """The features of ``new`` from those computed with ``old`` (same model and data, other
    factors, e.g. another normalisation): per module, P' = (Q'_G^T Q_G) P (Q_A^T Q'_A), exact
    when each side that differs is a complete eigenbasis in ``old`` (dense, perp = 0); a side
    whose eigenvectors are the very same in both is left as it is (e.g. ``lm_head``'s low-rank
    output-gradient side, when only its input side changed). Raises ValueError for a module with
    a low-rank side that changed (its features need a Jacobian pass with ``new``)."""
    proj = {}
    for name, m in new.modules.items():
        o = old.modules[name]
        p = features.proj[name]
        for side in ("g", "a"):
            before, after = getattr(o, side), getattr(m, side)
            if torch.equal(before.evecs, after.evecs):
                continue
            if before.rank != before.dim:
                raise ValueError(
                    f"module {name}: low-rank {side.upper()} factor changed; recompute its features"
                )
            if side == "g":
                p = (after.evecs.double().T @ before.evecs.double()) @ p  # (k'_g, d_out) P
            else:
                p = p @ (before.evecs.double().T @ after.evecs.double())  # P (d_in, k'_a)
        proj[name] = p
    return replace(features, proj=proj)


def logit_covariance(features: JacobianFeatures, post: Posterior) -> Tensor:
    """Covariance (N, K, K) of the logit contrasts at the posterior's prior precision."""
    if not post.prior_precision:
        raise ValueError("the posterior has no prior precision; tune it first")
    cov = 0
    for m_name, m in post.modules.items():
        p, q = features.perp[m_name][None], features.proj[m_name][None]
        lam = _lams(post, (m_name,))
        w = _weights(m.a.evals[None].double(), m.g.evals[None].double(), lam)
        cov = cov + _covariance(p, q, w, lam)
    return (cov + cov.transpose(1, 2)) / 2


def predict_covariance(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    post: Posterior,
    progress: bool = False,
    total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """MAP logits (N, C) and the contrast covariance (N, K, K) at the posterior's prior,
    batch by batch: unlike :func:`jacobian_features`, nothing of size P per example is kept
    (with dense factors the projections are P numbers per example)."""
    mean, covs = predict_covariances(
        model, batches, logits_fn, modules, {"": post}, progress, total
    )
    return mean, covs[""]


def predict_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    posts: dict[str, Posterior],
    progress: bool = False,
    total: int | None = None,
    dist: Dist | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """As :func:`predict_covariance` for several posteriors from one Jacobian pass: each over
    its own modules (a subset of ``modules``, e.g. the last layer's) at its own prior. Returns
    the MAP logits (N, C) and a contrast covariance (N, K, K) per posterior. With ``dist`` each
    rank computes its contiguous share of ``batches`` and every rank returns all of them."""
    d = dist or SINGLE
    if d.active:
        batches, total = shard(list(batches), d, allow_empty=True), None
    for key, post in posts.items():
        if not post.prior_precision:
            raise ValueError(f"the posterior {key!r} has no prior precision; tune it first")
    needed = {n for post in posts.values() for n in post.modules}
    mods = {n: m for n, m in modules.items() if n in needed}
    means: list[Tensor] = []
    covs: dict[str, list[Tensor]] = {k: [] for k in posts}
    groups: dict[tuple[str, tuple[str, ...]], list[tuple[_Group, Tensor, Tensor]]] = {}
    route = token_route(posts.values())
    jacobians = _contrast_pass(model, batches, logits_fn, mods, route, progress, total)
    for b, (logits, jac) in enumerate(jacobians):
        means.append(logits)
        projected: dict[tuple, tuple[Tensor, Tensor]] = {}  # posteriors sharing factors share these
        for key, post in posts.items():
            routes = (key, _routes(jac))
            if routes not in groups:
                found = _groups(post, {n: jac[n] for n in post.modules})
                groups[routes] = [_with_weights(post, g) for g in found]
            cov = 0
            for group, w, lam in groups[routes]:
                same = tuple(id(post.modules[n]) for n in group.names)
                if same not in projected:
                    projected[same] = _project(group, jac)
                perp, proj = projected[same]
                cov = cov + _covariance(perp, proj, w, lam)
            if not torch.isfinite(cov).all():
                raise NonFiniteError(f"non-finite predictive covariance in batch {b} ({key})")
            covs[key].append(((cov + cov.transpose(1, 2)) / 2).cpu())
    return gather_cat(cat_or_none(means), d), {
        k: gather_cat(cat_or_none(v), d) for k, v in covs.items()
    }


def predictive_probs(
    mean: Tensor,
    cov: Tensor,
    link: Link | str = Link.MC,
    samples: int = 10000,
    seed: int = 0,
    chunk: int = 256,
) -> Tensor:
    """Predictive probabilities (N, C) from MAP logits ``mean`` (N, C) and the contrast
    covariance ``cov`` (N, K, K).

    ``mc``: average of softmax([d, 0]) over ``samples`` draws d ~ N(D mu, cov) (seeded).
    ``probit``: softmax([D mu / sqrt(1 + pi/8 diag(cov)), 0]); for two choices this is the
    binary probit sigmoid(mu_d / sqrt(1 + pi/8 var_d)) (MacKay 1992).
    """
    link = Link(link)
    mean = mean.double()
    mu = mean[:, :-1] - mean[:, -1:]  # (N, K)
    zero = mu.new_zeros(mu.shape[0], 1)
    if link is Link.PROBIT:
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(cov, dim1=1, dim2=2))
        return torch.softmax(torch.cat([mu * kappa, zero], dim=1), dim=1)
    evals, evecs = torch.linalg.eigh(cov)  # robust square root of a PSD matrix
    root = evecs * evals.clamp(min=0).sqrt()[:, None, :]  # (N, K, K)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, mu.shape[0], chunk):
        sl = slice(start, start + chunk)
        n = mu[sl].shape[0]
        eps = torch.randn(n, samples, mu.shape[1], generator=gen, dtype=torch.float64)
        draws = mu[sl, None, :] + torch.einsum("nkj,nsj->nsk", root[sl], eps)  # (n, S, K)
        draws = torch.cat([draws, draws.new_zeros(n, samples, 1)], dim=2)
        out.append(torch.softmax(draws, dim=2).mean(dim=1))
    return torch.cat(out)


def predict(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    post: Posterior,
    link: Link | str = Link.MC,
    samples: int = 10000,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Laplace predictive probabilities (N, C) and the contrast covariance (N, K, K)."""
    mean, cov = predict_covariance(model, batches, logits_fn, modules, post, progress)
    return predictive_probs(mean, cov, link, samples, seed), cov
