"""Low-rank Kronecker factor updates: exactness and top-k accuracy (method.md 3 and 7)."""

from __future__ import annotations

import pytest
import torch
from cases import report_close

from lalora.laplace.kron import (
    DenseAccumulator,
    NystromAccumulator,
    SvdAccumulator,
    make_accumulator,
)


def stream(acc, rows: torch.Tensor, chunk: int = 7):
    for start in range(0, rows.shape[0], chunk):
        acc.update(rows[start : start + chunk])
    return acc


def decaying_rows(n: int, d: int, seed: int = 0, decay: float = 0.5) -> torch.Tensor:
    """Rows whose covariance has eigenvalues ~ decay^(2i): a fast-decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = decay ** torch.arange(d, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scales @ Q.T


def exact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(rows.T @ rows)
    return evals.flip(0), evecs.flip(1)


def test_rank_at_least_dim_is_dense_and_exact():
    rows = decaying_rows(50, 12)
    for update in ("svd", "nystrom"):
        acc = make_accumulator(12, rank=12, max_dense=3, update=update)
        assert isinstance(acc, DenseAccumulator)
        report_close(stream(acc, rows).finalize().dense(), rows.T @ rows, atol=1e-12)


@pytest.mark.parametrize("update", ["svd", "nystrom"])
def test_low_rank_data_is_recovered_exactly(update):
    """When the rows span at most k dimensions both updates are exact (up to round-off)."""
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    rows = torch.randn(60, 5, generator=gen, dtype=torch.float64) @ basis  # rank 5
    acc = SvdAccumulator(40, 6) if update == "svd" else NystromAccumulator(40, 6, sketch=12)
    f = stream(acc, rows).finalize()
    report_close(f.dense(), rows.T @ rows, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("update", ["svd", "nystrom"])
def test_top_k_eigenpairs_match_exact(update):
    """k < d on a spectrum decaying by 0.25 per eigenvalue. Incremental SVD truncates the tail at
    every update and Nystrom reconstructs from a sketch of 2k + 10 columns; either way the error
    of the i-th kept eigenpair is governed by the gap to the discarded part, lambda_{k+1} /
    lambda_i. We require relative eigenvalue error and 1 - |cos angle| of the eigenvector below
    0.1 * lambda_{k+1} / lambda_i (2.5e-2 for the k-th pair, tighter for the larger ones)."""
    d, k = 64, 8
    rows = decaying_rows(400, d, decay=0.5)
    evals, evecs = exact(rows)
    acc = SvdAccumulator(d, k) if update == "svd" else NystromAccumulator(d, k, sketch=2 * k + 10)
    f = stream(acc, rows, chunk=16).finalize()
    assert f.rank == k
    bound = 0.1 * evals[k] / evals[:k]
    rel = (f.evals - evals[:k]).abs() / evals[:k]
    assert bool((rel < bound).all()), rel
    overlap = (f.evecs.T @ evecs[:, :k]).diagonal().abs()
    assert bool((1 - overlap < bound).all()), overlap


def test_scale_and_zero_data():
    rows = decaying_rows(30, 20)
    for acc in (SvdAccumulator(20, 4), NystromAccumulator(20, 4, 14), DenseAccumulator(20)):
        f1 = stream(acc, rows).finalize(1.0)
        f2 = acc.finalize(0.25)
        report_close(f2.evals, 0.25 * f1.evals, atol=1e-12)
    for acc in (SvdAccumulator(20, 4), NystromAccumulator(20, 4, 14)):
        acc.update(torch.zeros(3, 20))
        f = acc.finalize()
        assert f.rank == 4 and float(f.evals.abs().max()) == 0.0
        report_close(f.evecs.T @ f.evecs, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_svd_update_of_a_large_batch_goes_in_chunks_and_stays_exact():
    """One update of 300 rows (more than the 64-row chunk) equals the exact factor for rank-5
    data and keeps the root at k columns."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(300, 5, generator=gen, dtype=torch.float64) @ torch.randn(
        5, 30, generator=gen, dtype=torch.float64
    )
    acc = SvdAccumulator(30, 6)
    acc.update(rows)
    assert acc.L.shape == (30, 6)
    report_close(acc.finalize().dense(), rows.T @ rows, rtol=1e-9, atol=1e-9)
