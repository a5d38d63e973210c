"""Accuracy against the exact Kronecker factors and the exact predictive covariance.

Per module the curvature block is X_m = A_m (x) G_m. Conventions differ by a global factor
(bayesian-lora averages over batches and uses a mean-reduced loss), which a tuned prior absorbs,
so each method's blocks are first scaled by the one c minimising sum_m ||c X_m - E_m||_F, and
the error is sqrt(sum_m ||c X_m - E_m||^2 / sum_m ||E_m||^2). Frobenius inner products of
Kronecker products factorise, <A (x) G, A' (x) G'> = <A, A'> <G, G'>, so no block is formed.
"""

from __future__ import annotations

import math

from torch import Tensor

Blocks = dict[str, tuple[Tensor, Tensor]]  # name -> (A (d_in, d_in), G (d_out, d_out)), dense


def _inner(x: tuple[Tensor, Tensor], y: tuple[Tensor, Tensor]) -> float:
    return float((x[0] * y[0]).sum() * (x[1] * y[1]).sum())


def block_error(approx: Blocks, exact: Blocks) -> tuple[float, float]:
    """(relative error after the best global scale, that scale c)."""
    xe = sum(_inner(approx[n], exact[n]) for n in exact)
    xx = sum(_inner(approx[n], approx[n]) for n in exact)
    ee = sum(_inner(exact[n], exact[n]) for n in exact)
    c = xe / xx if xx > 0 else 0.0
    return math.sqrt(max(c * c * xx - 2 * c * xe + ee, 0.0) / ee), c


def ours_blocks(post) -> Blocks:
    return {n: (m.a.dense(), m.g.dense()) for n, m in post.modules.items()}


def reference_blocks(factors: dict[str, tuple[Tensor, Tensor]], rank: int) -> Blocks:
    """bayesian-lora's factors as dense blocks: a side stored as a (d, rank) root R is R R^T."""

    def dense(f: Tensor) -> Tensor:
        f = f.double()
        return f @ f.T if f.shape[1] == rank and f.shape[0] != rank else f

    return {n: (dense(a), dense(s)) for n, (a, s) in factors.items()}


def contrast_variance(cov: Tensor) -> Tensor:
    """Variance of f_1 - f_2 (N,) from a full two-class logit covariance (N, 2, 2)."""
    return cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1]


def variance_error(approx: Tensor, exact: Tensor) -> float:
    """Median relative error of per-example predictive variances (N,)."""
    return float(((approx - exact).abs() / exact.abs()).median())
