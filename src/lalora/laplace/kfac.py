"""Kronecker-factored GGN/Fisher of the LoRA weights (method.md sections 2-3).

For module m with inputs a (rows: every non-padding position, KFAC-"expand", Eschenhagen et al.
2023) and output gradients g:

    A_m = 1/(N_rows) sum_{n,t} a_{n,t} a_{n,t}^T        (d_in, d_in)
    G_m = sum_{n,t,k} g_{n,t,k} g_{n,t,k}^T               (d_out, d_out)

the normalisation curvlinops' ``KFACLinearOperator`` uses for a sum-reduced loss, so that with one
datum and T = 1 the product A_m (x) G_m is the exact GGN block (``normalisation: rows``). Two
others, for comparison with the paper's code (Yang et al. 2024, adamxyang/laplace-lora, through
ASDL and laplace-torch's ASDL backend):

- ``sequences``: A_m divided by the number of sequences N instead of the non-padding rows, i.e.
  A_m scaled by N_rows / N (about the mean prompt length on the attention maps; 1 on ``lm_head``,
  which reads one position per sequence);
- ``sequences_padded``: the paper's code exactly: every row of the padded (B, T, d_in) input,
  padding positions included, summed into A_m and divided by N sequences.

``g_{n,t,k}`` is the gradient reached by backpropagating column k of a square root S_n of the
loss Hessian w.r.t. the logits:
- ``exact`` (type-2 Fisher): Lambda_n = diag(p) - p p^T has rank C - 1, so its C - 1 non-zero
  eigenpairs give S_n (C, C - 1) exactly, with C - 1 backward passes (one for two choices);
- ``mc``: one sampled label y ~ p, S_n = p - e_y (one backward pass);
- ``empirical``: the true label, S_n = p - e_y (one backward pass).

All passes share one forward; the factors are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora.devices import statistics_device
from lalora.distributed import SINGLE, Dist, all_reduce_, all_reduce_sum, bounds, shard
from lalora.errors import NonFiniteError
from lalora.laplace.hooks import Tap, lora_grad_enabled, output_gradients
from lalora.laplace.kron import Factor, make_accumulator
from lalora.laplace.posterior import ModuleFactors, Posterior

LogitsFn = Callable[[nn.Module, Any], Tensor]


class Fisher(StrEnum):
    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"


class Normalisation(StrEnum):
    ROWS = "rows"
    SEQUENCES = "sequences"
    SEQUENCES_PADDED = "sequences_padded"


class LowRankUpdate(StrEnum):
    SVD = "svd"
    NYSTROM = "nystrom"


def exact_fisher_root(logits: Tensor) -> Tensor:
    """S (B, C, C - 1) with S S^T = diag(p) - p p^T, p = softmax(logits) (B, C), in float64."""
    p = torch.softmax(logits.double(), dim=-1)  # (B, C)
    if p.shape[-1] == 2:  # closed form: Lambda = p1 p2 (e1 - e2)(e1 - e2)^T
        s = (p[:, 0] * p[:, 1]).sqrt()  # (B,)
        return torch.stack([s, -s], dim=-1)[:, :, None]
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (B, C, C)
    evals, evecs = torch.linalg.eigh(lam)  # ascending; the first is the zero mode
    return evecs[:, :, 1:] * evals[:, None, 1:].clamp(min=0).sqrt()


def fisher_root(
    logits: Tensor, labels: Tensor, fisher: Fisher, generator: torch.Generator | None = None
) -> Tensor:
    """Output-gradient vectors (B, C, K) whose outer products sum to the chosen Fisher."""
    fisher = Fisher(fisher)
    if fisher is Fisher.EXACT:
        return exact_fisher_root(logits)
    p = torch.softmax(logits.double(), dim=-1)
    if fisher is Fisher.MC:
        labels = torch.multinomial(p, 1, generator=generator).squeeze(1)
    onehot = nn.functional.one_hot(labels, p.shape[-1]).double()
    return (p - onehot)[:, :, None]


def _host(f: Factor) -> Factor:
    """A factor in host memory (the posterior is saved, tuned and read there)."""
    return Factor(evecs=f.evecs.cpu(), evals=f.evals.cpu())


def _mask(batch: Any) -> Tensor | None:
    return getattr(batch, "attention_mask", None)


def fit_kfac(
    model: nn.Module,
    batches: Iterable[Any],
    logits_fn: LogitsFn,
    modules: dict[str, nn.Linear],
    fisher: Fisher | str = Fisher.EXACT,
    rank: int = 10,
    max_dense: int = 4096,
    update: LowRankUpdate | str = LowRankUpdate.SVD,
    seed: int = 0,
    progress: bool = False,
    total: int | None = None,
    dist: Dist | None = None,
    normalisation: Normalisation | str = Normalisation.ROWS,
) -> Posterior:
    """Fit the Kronecker factors of ``modules`` (LoRA ``nn.Linear`` maps) over ``batches``.

    With ``dist`` (several processes, :mod:`lalora.distributed`) each rank takes its
    contiguous share of ``batches`` and the statistics (factor accumulators, row and data
    counts, log-likelihood) are summed over the ranks before the eigendecompositions; the MC
    Fisher's labels are drawn per batch (seeded by ``seed`` and the batch's index), so they do
    not depend on the split either.

    Args:
        model: the network, evaluated in eval mode (no dropout).
        batches: objects with ``labels`` (B,) and optionally ``attention_mask`` (B, T).
        logits_fn: ``logits_fn(model, batch) -> (B, C)`` answer logits.
        modules: name -> linear map whose weight (d_out, d_in) gets factors.
        fisher: ``exact`` (C - 1 passes), ``mc`` or ``empirical`` (one pass each).
        rank, max_dense, update: sides larger than ``max_dense`` (and than ``rank``) are kept
            low-rank (rank ``rank``, by ``update``); the others dense.
        normalisation: what divides the input factor: ``rows`` (the non-padding rows), or
            ``sequences`` / ``sequences_padded`` (the number of sequences; the latter with the
            padding rows' activations in the sum, as the paper's code has them).

    Returns:
        A :class:`Posterior` without a prior (see :func:`lalora.laplace.marglik.tune_prior`).
    """
    d = dist or SINGLE
    if d.active:
        batches = list(batches)
        first = bounds(len(batches), d)[0]
        batches, total = shard(batches, d), None
    else:
        first = 0
    fisher = Fisher(fisher)
    normalisation = Normalisation(normalisation)
    padded = normalisation is Normalisation.SEQUENCES_PADDED
    update = LowRankUpdate(update).value
    device = next(iter(modules.values())).weight.device
    where = statistics_device(device)
    a_acc, g_acc, n_rows = {}, {}, dict.fromkeys(modules, 0)
    index = {name: i for i, name in enumerate(modules)}
    for name, mod in modules.items():
        d_out = mod.weight.shape[0]
        g_acc[name] = make_accumulator(
            d_out, rank, max_dense, update, seed=seed + 2 * index[name] + 1, device=where
        )
    shared: dict[str, str] = {}  # module -> the module whose input (and input factor) it shares
    gen = torch.Generator(device=device)
    n_data, log_lik, confidence, trace = 0, 0.0, 0.0, 0.0

    def on_input(name: str, a: Tensor, source: str) -> None:  # a (B, T, d_in), padding zeroed
        if shared.get(name, name) != source and (name in shared or name in a_acc):
            raise RuntimeError(f"module {name} changed which module's input it shares")
        if source != name:  # the same activations as an earlier module: one factor
            shared[name] = source
            return
        if name not in a_acc:
            d_in = modules[name].weight.shape[1]
            a_acc[name] = make_accumulator(
                d_in, rank, max_dense, update, seed=seed + 2 * index[name], device=where
            )
        mask = tap.mask
        rows = (
            int(mask.sum())
            if mask is not None and mask.shape[1] == a.shape[1] and not padded
            else a.shape[0] * a.shape[1]
        )
        n_rows[name] += rows
        a_acc[name].update(a.reshape(-1, a.shape[-1]))

    def on_grad(name: str, a: Tensor, g: Tensor) -> None:  # g (B, T, d_out)
        g_acc[name].update(g.reshape(-1, g.shape[-1]))

    was_training = model.training
    model.eval()
    with lora_grad_enabled(modules), Tap(modules, on_grad, on_input, mask_inputs=not padded) as tap:
        for b, batch in enumerate(tqdm(batches, desc="kfac", disable=not progress, total=total)):
            tap.mask = _mask(batch)
            logits = logits_fn(model, batch)  # (B, C)
            if not torch.isfinite(logits).all():
                raise NonFiniteError(f"non-finite logits in batch {b}")
            logp = torch.log_softmax(logits.detach().double(), -1)  # (B, C)
            log_lik += float(logp.gather(1, batch.labels[:, None]).sum())
            confidence += float(logp.exp().amax(-1).sum())
            trace += float((1 - logp.exp().pow(2).sum(-1)).sum())  # tr(diag p - p p^T)
            n_data += logits.shape[0]
            gen.manual_seed(seed * 1_000_003 + first + b)
            roots = fisher_root(logits.detach(), batch.labels, fisher, gen)  # (B, C, K)
            output_gradients(logits, roots, tap.outputs)
    model.train(was_training)
    if d.active:  # the same modules, in the same order, on every rank
        for name in modules:
            if name in a_acc:
                a_acc[name].reduce(d)
            g_acc[name].reduce(d)
        counts = torch.tensor([n_rows[n] for n in modules] + [n_data], dtype=torch.float64)
        all_reduce_(counts, d)
        n_rows = {n: int(c) for n, c in zip(modules, counts[:-1].tolist(), strict=True)}
        n_data = int(counts[-1])
        log_lik = all_reduce_sum(log_lik, d)
        confidence = all_reduce_sum(confidence, d)
        trace = all_reduce_sum(trace, d)

    factors = {}
    count = (lambda n: n_rows[n]) if normalisation is Normalisation.ROWS else (lambda n: n_data)
    a_factors = {n: _host(acc.finalize(1.0 / max(count(n), 1))) for n, acc in a_acc.items()}
    for name, mod in modules.items():
        source = shared.get(name, name)
        if source not in a_factors:  # never reached by the data: a zero factor
            d_in = mod.weight.shape[1]
            a_factors[source] = make_accumulator(d_in, rank, max_dense, update).finalize()
        a = a_factors[source]  # one object for modules sharing an input
        g = _host(g_acc[name].finalize(1.0))
        for side, f in (("input", a), ("output-gradient", g)):
            if not (torch.isfinite(f.evals).all() and torch.isfinite(f.evecs).all()):
                raise NonFiniteError(f"non-finite {side} factor in module {name}")
        theta_sq = float(mod.weight.detach().double().pow(2).sum())
        factors[name] = ModuleFactors(a=a, g=g, theta_sq=theta_sq, n_rows=n_rows[source])
    return Posterior(
        modules=factors,
        n_data=n_data,
        fisher=fisher.value,
        log_likelihood=log_lik,
        normalisation=normalisation.value,
        train_confidence=confidence / max(n_data, 1),
        fisher_trace=trace,
    )


def renormalise(post: Posterior, normalisation: Normalisation | str) -> Posterior:
    """``post`` (fitted with ``rows``) with its input factors divided by the number of sequences
    instead (``sequences``): A_m scaled by N_rows / N, eigenvectors unchanged, factors shared by
    several modules still shared. ``sequences_padded`` needs the padding rows' activations, so
    it takes its own fit."""
    from dataclasses import replace

    normalisation = Normalisation(normalisation)
    if post.normalisation != Normalisation.ROWS:
        raise ValueError(f"renormalise takes a rows-normalised posterior, not {post.normalisation}")
    if normalisation is Normalisation.ROWS:
        return post
    if normalisation is not Normalisation.SEQUENCES:
        raise ValueError("sequences_padded needs the padding rows: fit_kfac(normalisation=...)")
    scaled: dict[int, Any] = {}
    modules = {}
    for name, m in post.modules.items():
        if id(m.a) not in scaled:
            c = m.n_rows / max(post.n_data, 1)
            scaled[id(m.a)] = replace(m.a, evals=m.a.evals * c)
        modules[name] = replace(m, a=scaled[id(m.a)])
    return replace(post, modules=modules, normalisation=normalisation.value)
