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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora.core.errors import NonFiniteError
from lalora.laplace.hooks import Tap, lora_grad_enabled, output_gradients
from lalora.laplace.kron import Factor, make_accumulator
from lalora.laplace.posterior import ModuleFactors, Posterior
from lalora.runtime.devices import statistics_device
from lalora.runtime.distributed import SINGLE, Dist, all_reduce_, all_reduce_sum, bounds, shard

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


@dataclass
class Statistics:
    """What one pass over the data accumulates for the factors of ``modules``: an input-side
    accumulator per distinct input (a module reading another's input shares its factor,
    ``shared``), an output-gradient accumulator per module, the rows per input and, per datum,
    the log-likelihood, the top-class confidence and tr(diag p - p p^T). Accumulators live on
    ``device`` in float64 (:func:`lalora.runtime.devices.statistics_device`); side ``i`` of module
    ``m`` (0 input, 1 output gradient) draws its sketch from ``seed + 2 m + i``."""

    modules: dict[str, nn.Linear]
    rank: int
    max_dense: int
    update: str
    seed: int
    device: torch.device
    padded: bool  # the padding rows' activations are summed and counted
    a_acc: dict = field(default_factory=dict)
    g_acc: dict = field(default_factory=dict)
    n_rows: dict = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # module -> whose input it reads
    mask: Tensor | None = None  # the current batch's attention mask (B, T)
    n_data: int = 0
    log_lik: float = 0.0
    confidence: float = 0.0
    trace: float = 0.0

    def __post_init__(self) -> None:
        self.n_rows = dict.fromkeys(self.modules, 0)
        for i, (name, mod) in enumerate(self.modules.items()):
            self.g_acc[name] = self._accumulator(mod.weight.shape[0], 2 * i + 1)

    def _accumulator(self, size: int, side: int):
        return make_accumulator(size, self.rank, self.max_dense, self.update,
                                seed=self.seed + side, device=self.device)  # fmt: skip

    def on_input(self, name: str, a: Tensor, source: str) -> None:
        """Module ``name``'s input a (B, T, d_in), padding zeroed, first read by ``source``."""
        if self.shared.get(name, name) != source and (name in self.shared or name in self.a_acc):
            raise RuntimeError(f"module {name} changed which module's input it shares")
        if source != name:  # the same activations as an earlier module: one factor
            self.shared[name] = source
            return
        if name not in self.a_acc:
            i = list(self.modules).index(name)
            self.a_acc[name] = self._accumulator(self.modules[name].weight.shape[1], 2 * i)
        mask = self.mask
        counted = mask is not None and mask.shape[1] == a.shape[1] and not self.padded
        self.n_rows[name] += int(mask.sum()) if counted else a.shape[0] * a.shape[1]
        self.a_acc[name].update(a.reshape(-1, a.shape[-1]))

    def on_grad(self, name: str, a: Tensor, g: Tensor) -> None:
        """Module ``name``'s output gradient g (B, T, d_out) for one Fisher root column."""
        self.g_acc[name].update(g.reshape(-1, g.shape[-1]))

    def on_logits(self, logits: Tensor, labels: Tensor) -> None:
        """A batch's answer logits (B, C) and labels (B,)."""
        logp = torch.log_softmax(logits.detach().double(), -1)  # (B, C)
        self.log_lik += float(logp.gather(1, labels[:, None]).sum())
        self.confidence += float(logp.exp().amax(-1).sum())
        self.trace += float((1 - logp.exp().pow(2).sum(-1)).sum())  # tr(diag p - p p^T)
        self.n_data += logits.shape[0]

    def reduce(self, d: Dist) -> None:
        """Sum every statistic over the ranks (the same modules, in the same order, on all)."""
        if not d.active:
            return
        for name in self.modules:
            if name in self.a_acc:
                self.a_acc[name].reduce(d)
            self.g_acc[name].reduce(d)
        counts = [self.n_rows[n] for n in self.modules] + [self.n_data]
        counts = all_reduce_(torch.tensor(counts, dtype=torch.float64), d)
        self.n_rows = {n: int(c) for n, c in zip(self.modules, counts[:-1].tolist(), strict=True)}
        self.n_data = int(counts[-1])
        self.log_lik = all_reduce_sum(self.log_lik, d)
        self.confidence = all_reduce_sum(self.confidence, d)
        self.trace = all_reduce_sum(self.trace, d)

    def finalize(self, fisher: Fisher, normalisation: Normalisation) -> Posterior:
        """The posterior's factors in host memory: A_m divided by its rows (``rows``) or by
        the number of data (otherwise), a zero factor for an input the data never reached."""
        by_rows = normalisation is Normalisation.ROWS
        a_factors = {
            n: _host(acc.finalize(1.0 / max(self.n_rows[n] if by_rows else self.n_data, 1)))
            for n, acc in self.a_acc.items()
        }
        factors = {}
        for name, mod in self.modules.items():
            source = self.shared.get(name, name)
            if source not in a_factors:  # never reached by the data: a zero factor
                d_in = mod.weight.shape[1]
                a_factors[source] = make_accumulator(
                    d_in, self.rank, self.max_dense, self.update
                ).finalize()
            a = a_factors[source]  # one object for modules sharing an input
            g = _host(self.g_acc[name].finalize(1.0))
            for side, f in (("input", a), ("output-gradient", g)):
                if not (torch.isfinite(f.evals).all() and torch.isfinite(f.evecs).all()):
                    raise NonFiniteError(f"non-finite {side} factor in module {name}")
            theta_sq = float(mod.weight.detach().double().pow(2).sum())
            factors[name] = ModuleFactors(a=a, g=g, theta_sq=theta_sq, n_rows=self.n_rows[source])
        return Posterior(
            modules=factors,
            n_data=self.n_data,
            fisher=fisher.value,
            log_likelihood=self.log_lik,
            normalisation=normalisation.value,
            train_confidence=self.confidence / max(self.n_data, 1),
            fisher_trace=self.trace,
        )


def _accumulate(
    model: nn.Module, batches: Iterable[Any], logits_fn: LogitsFn, stats: Statistics,
    fisher: Fisher, seed: int, first: int, progress: bool, total: int | None,
) -> None:  # fmt: skip
    """One pass over ``batches`` (this rank's, the first of which is batch ``first`` of all) in
    eval mode: one forward and the backward passes of the Fisher's roots per batch into
    ``stats``; the MC labels of batch b are drawn with seed ``seed * 1000003 + first + b``."""
    device = next(iter(stats.modules.values())).weight.device
    gen = torch.Generator(device=device)
    was_training = model.training
    model.eval()
    tap = Tap(stats.modules, stats.on_grad, stats.on_input, mask_inputs=not stats.padded)
    with lora_grad_enabled(stats.modules), tap:
        for b, batch in enumerate(tqdm(batches, desc="kfac", disable=not progress, total=total)):
            stats.mask = tap.mask = _mask(batch)
            logits = logits_fn(model, batch)  # (B, C)
            if not torch.isfinite(logits).all():
                raise NonFiniteError(f"non-finite logits in batch {b}")
            stats.on_logits(logits, batch.labels)
            gen.manual_seed(seed * 1_000_003 + first + b)
            roots = fisher_root(logits.detach(), batch.labels, fisher, gen)  # (B, C, K)
            output_gradients(logits, roots, tap.outputs)
    model.train(was_training)


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

    With ``dist`` (several processes, :mod:`lalora.runtime.distributed`) each rank takes its
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
        seed: the sketches' and the MC labels' seed.
        progress, total: a progress bar (over ``total`` batches when ``batches`` has no len).
        dist: the process group (default: one process).
        normalisation: what divides the input factor: ``rows`` (the non-padding rows), or
            ``sequences`` / ``sequences_padded`` (the number of sequences; the latter with the
            padding rows' activations in the sum, as the paper's code has them).

    Returns:
        A :class:`Posterior` without a prior (see :func:`lalora.laplace.marglik.tune_prior`).
    """
    d = dist or SINGLE
    first = 0
    if d.active:
        batches = list(batches)
        first = bounds(len(batches), d)[0]
        batches, total = shard(batches, d), None
    fisher, normalisation = Fisher(fisher), Normalisation(normalisation)
    padded = normalisation is Normalisation.SEQUENCES_PADDED
    device = next(iter(modules.values())).weight.device
    stats = Statistics(modules, rank, max_dense, LowRankUpdate(update).value, seed,
                       statistics_device(device), padded)  # fmt: skip
    _accumulate(model, batches, logits_fn, stats, fisher, seed, first, progress, total)
    stats.reduce(d)
    return stats.finalize(fisher, normalisation)


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
