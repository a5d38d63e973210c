"""Low-rank Kronecker factors: streaming accumulation and eigendecomposition.

A Kronecker factor F = sum_rows x x^T of side d is kept as its eigendecomposition
``F ~ Q diag(lam) Q^T`` with Q of shape (d, k): k = d (dense) when d is at most ``max_dense``
or the rank is at least d, else k = rank (low-rank). Three accumulators share one interface
(``update(rows)`` with rows (m, d), ``finalize(scale) -> Factor``):

- :class:`DenseAccumulator`: F += rows^T rows in float64 (exact).
- :class:`SvdAccumulator`: the paper's incremental SVD (Yang et al. 2024): L (d, k) with
  L L^T ~ F; per update of c rows, L <- top-k left singular vectors of [L, rows^T] times their
  singular values, computed through the (k + c) x (k + c) Gram matrix. A batch's m rows go in
  chunks of c <= 64, so the cost is O(m d (k + c) + m (k + c)^2), linear in m (one update of all
  m rows at once would cost O(d (k + m)^2 + (k + m)^3)); exact while rank(F) <= k.
- :class:`NystromAccumulator`: a streaming Nystrom sketch Y = F Omega (Tropp, Yurtsever, Udell,
  Cevher 2017, "Fixed-rank approximation of a positive-semidefinite matrix from streaming data"),
  Omega (d, s) an orthonormalised Gaussian test matrix, s = sketch size >= k. Cost O(d m s) per
  update; the final fixed-rank reconstruction is exact when rank(F) <= s. Sketches from several
  workers add up (``Y`` is linear in the data) before ``finalize``.

Data parallel (``reduce(dist)``, before ``finalize``): dense sums and Nystrom sketches (the same
seeded Omega on every rank) are summed over the ranks, so the result equals the 1-process one to
float64 round-off; incremental-SVD roots are gathered and merged (the top k of [L_0, ..., L_N-1],
exact while the rank of F is at most k, like the streaming update itself).

Each accumulator keeps its float64 buffers on ``device`` (the compute device where it has
float64, :func:`lalora.runtime.devices.statistics_device`; otherwise the host, each batch's product
being formed on the compute device and added there). The Nystrom test matrix is drawn on the
CPU, so it is the same whatever the device.

Eigenvalues are clipped at zero (round-off can make tiny ones negative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lalora.runtime.distributed import Dist, all_gather_objects, all_reduce_

DTYPE = torch.float64


@dataclass(frozen=True)
class Factor:
    """F ~ Q diag(lam) Q^T: ``evecs`` (d, k) orthonormal columns, ``evals`` (k,) >= 0, sorted
    descending. ``k == d`` means the factor is kept exactly (dense)."""

    evecs: Tensor
    evals: Tensor

    @property
    def dim(self) -> int:
        return self.evecs.shape[0]

    @property
    def rank(self) -> int:
        return self.evecs.shape[1]

    def dense(self) -> Tensor:
        """The (d, d) matrix (tests and small sides only)."""
        return (self.evecs * self.evals) @ self.evecs.T


def eig_factor(matrix: Tensor, k: int | None = None) -> Factor:
    """Eigendecomposition of a symmetric PSD (d, d) matrix, top ``k`` kept, clipped at zero."""
    evals, evecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    evals, evecs = evals.flip(0), evecs.flip(1)
    if k is not None:
        evals, evecs = evals[:k], evecs[:, :k]
    return Factor(evecs=evecs.contiguous(), evals=evals.clamp(min=0).contiguous())


def factor_from_root(L: Tensor, k: int) -> Factor:
    """Factor of L L^T from a root L (d, m) via a thin SVD, top ``k`` kept."""
    U, S, _ = torch.linalg.svd(L, full_matrices=False)
    if U.shape[1] < k:  # pad with an orthonormal completion and zero eigenvalues
        eye = torch.eye(L.shape[0], k, dtype=L.dtype, device=L.device)
        Q, _ = torch.linalg.qr(torch.cat([U, eye], dim=1))
        U = torch.cat([U, Q[:, U.shape[1] : k]], dim=1)
        S = torch.cat([S, S.new_zeros(k - S.shape[0])])
    return Factor(evecs=U[:, :k].contiguous(), evals=(S[:k] ** 2).contiguous())


class DenseAccumulator:
    """Exact sum of outer products, (d, d), accumulated in float64. Each batch's product
    rows^T rows is computed in the rows' own dtype (float32 activations: a float32 GEMM, twice
    as fast, exact to float32 round-off of the batch sum) and added in float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(dim, dim, dtype=DTYPE, device=device)

    def update(self, rows: Tensor) -> None:  # rows (m, d)
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        self.sum.add_((rows.T @ rows).to(self.sum.device))  # cast to float64 in the add

    def reduce(self, dist: Dist) -> None:
        all_reduce_(self.sum, dist)

    def finalize(self, scale: float = 1.0) -> Factor:
        return eig_factor(self.sum * scale)


class SvdAccumulator:
    """Incremental SVD: root L (d, <= k) with L L^T ~ sum of outer products."""

    def __init__(self, dim: int, rank: int, chunk: int = 64, device: torch.device | str = "cpu"):
        self.rank = rank
        self.chunk = chunk
        self.L = torch.zeros(dim, 0, dtype=DTYPE, device=device)

    def update(self, rows: Tensor) -> None:
        rows = rows.to(self.L.device, DTYPE)
        rows = rows[rows.abs().amax(dim=1) > 0]  # zero rows (padding) change nothing
        for start in range(0, rows.shape[0], self.chunk):
            self._update(rows[start : start + self.chunk])

    def reduce(self, dist: Dist) -> None:
        """Merge the ranks' roots: the top k of [L_0, ..., L_N-1] (rank order)."""
        if dist.active:
            self._compress(torch.cat(all_gather_objects(self.L, dist), dim=1))

    def _update(self, rows: Tensor) -> None:
        self._compress(torch.cat([self.L, rows.T], dim=1))  # (d, k + c)

    def _compress(self, M: Tensor) -> None:
        # top-k of the SVD M = U S V^T through the small Gram matrix M^T M = V S^2 V^T:
        # U_k S_k = M V_k. All BLAS-3 in float64; the squared condition number only affects
        # singular values far below the top k, which are discarded.
        evals, V = torch.linalg.eigh(M.T @ M)  # ascending, (k + c,)
        k = min(self.rank, evals.shape[0])
        self.L = M @ V[:, -k:].flip(1)  # (d, k), columns U_j S_j

    def finalize(self, scale: float = 1.0) -> Factor:
        return factor_from_root(self.L * scale**0.5, self.rank)


class NystromAccumulator:
    """Streaming Nystrom sketch Y = F Omega with a fixed orthonormal test matrix Omega (d, s)."""

    def __init__(
        self, dim: int, rank: int, sketch: int, seed: int = 0, device: torch.device | str = "cpu"
    ):
        self.rank = rank
        s = min(dim, max(sketch, rank))
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(dim, s, generator=gen, dtype=DTYPE)
        self.omega = torch.linalg.qr(omega)[0].to(device)  # (d, s)
        self.Y = torch.zeros(dim, s, dtype=DTYPE, device=device)

    def update(self, rows: Tensor) -> None:
        rows = rows.to(self.Y.device, DTYPE)  # (m, d)
        self.Y.addmm_(rows.T, rows @ self.omega)  # (d, s)

    def reduce(self, dist: Dist) -> None:
        all_reduce_(self.Y, dist)

    def finalize(self, scale: float = 1.0) -> Factor:
        """Tropp et al. 2017, Algorithm 3: shifted Cholesky-based fixed-rank reconstruction."""
        Y = self.Y * scale
        norm = torch.linalg.matrix_norm(Y)
        if norm == 0:
            return factor_from_root(torch.zeros_like(Y), self.rank)
        nu = torch.finfo(DTYPE).eps * Y.shape[0] ** 0.5 * norm
        Y_nu = Y + nu * self.omega  # (d, s)
        B = self.omega.T @ Y_nu  # (s, s)
        C = torch.linalg.cholesky((B + B.T) / 2)  # lower: B = C C^T
        E = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T  # Y_nu C^{-T}, (d, s)
        U, S, _ = torch.linalg.svd(E, full_matrices=False)
        evals = (S**2 - nu).clamp(min=0)
        k = min(self.rank, S.shape[0])
        return Factor(evecs=U[:, :k].contiguous(), evals=evals[:k].contiguous())


Accumulator = DenseAccumulator | SvdAccumulator | NystromAccumulator


def make_accumulator(
    dim: int, rank: int, max_dense: int, update: str, seed: int = 0, oversample: int = 10,
    device: torch.device | str = "cpu",
) -> Accumulator:  # fmt: skip
    """Dense up to ``max_dense`` or when ``rank >= dim``; else the low-rank ``update``
    ("svd" or "nystrom", the latter with sketch size 2 * rank + oversample); its buffers on
    ``device``."""
    if dim <= max_dense or rank >= dim:
        return DenseAccumulator(dim, device)
    if update == "svd":
        return SvdAccumulator(dim, rank, device=device)
    if update == "nystrom":
        return NystromAccumulator(dim, rank, sketch=2 * rank + oversample, seed=seed, device=device)
    raise ValueError(f"unknown low-rank update {update!r}; known: svd, nystrom")
