"""The penalty's split over the curvature and the LoRA symmetry, against dense computations."""

from __future__ import annotations

import pytest
import torch
from cases import dense_jacobian, llama_batch, llama_case, llama_logits_fn, report_close

from lalora.laplace import fit_kfac
from lalora.laplace.diagnostics import (
    lora_symmetry,
    penalty_shares,
    remove_symmetry,
    symmetry_projection,
)
from lalora.models.adapters import lora_modules


def trained_case():
    """The tiny LLaMA with non-zero LoRA B maps (as after fine-tuning)."""
    model = llama_case()
    mods = lora_modules(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in mods.values():
            m.weight.copy_(0.5 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
    return model, mods


def test_projection_is_orthogonal_onto_the_symmetry_directions():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 3, generator=gen).double(), torch.randn(3, 5, generator=gen).double()
    dB, dA = torch.randn(6, 3, generator=gen).double(), torch.randn(3, 5, generator=gen).double()
    pB, pA = symmetry_projection(B, A, dB, dA)
    for i in range(3):  # the residual is orthogonal to every basis direction (B E_ij, -E_ij A)
        for j in range(3):
            E = torch.zeros(3, 3, dtype=torch.float64)
            E[i, j] = 1
            inner = float(((dB - pB) * (B @ E)).sum() - ((dA - pA) * (E @ A)).sum())
            assert abs(inner) < 1e-10
    qB, qA = symmetry_projection(B, A, pB, pA)  # idempotent
    report_close(qB, pB, atol=1e-10)
    report_close(qA, pA, atol=1e-10)


def test_symmetry_directions_have_zero_jacobian():
    """J (B E, -E A) = 0 for every adapter: the exact GGN has no curvature there."""
    model, mods = trained_case()
    fn = llama_logits_fn(2)
    names = list(mods)
    batch = llama_batch([5, 7], seed=2)
    J = dense_jacobian(model, batch, fn, names)  # (B, C, P)
    weights = {n: m.weight.detach().double() for n, m in mods.items()}
    gen = torch.Generator().manual_seed(1)
    delta = {
        n: torch.randn(w.shape, generator=gen, dtype=torch.float64) for n, w in weights.items()
    }
    sym = {n: delta[n] - r for n, r in remove_symmetry(weights, delta).items()}
    v = torch.cat([sym[n].flatten() for n in names])
    rest = torch.cat([remove_symmetry(weights, delta)[n].flatten() for n in names])
    assert float(v.norm()) > 0.1
    assert float((J @ v).abs().max()) < 1e-9 * float((J @ rest).abs().max())
    share = lora_symmetry(weights, delta)
    assert share["delta_sq"] == pytest.approx(float(v.pow(2).sum()), rel=1e-10)
    assert 0 < share["share"] < 1


def test_penalty_shares_add_up_and_equal_dense_curvature():
    model, mods = trained_case()
    post = fit_kfac(model, [llama_batch([4, 6, 5], seed=1)], llama_logits_fn(2), mods,
                    max_dense=3, rank=2)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    delta = {
        n: torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) for n, m in mods.items()
    }
    centred = post.with_delta(delta).with_prior(0.05)
    shares = penalty_shares(centred)
    assert shares.above + shares.below + shares.outside == pytest.approx(1.0, rel=1e-10)
    assert shares.outside > 0  # low-rank sides leave directions outside
    dense = 0.0
    for n, m in centred.modules.items():
        H = torch.kron(m.a.dense(), m.g.dense())
        v = delta[n].T.reshape(-1)  # column-major vec
        dense += float(v @ H @ v)
    assert shares.delta_h_delta == pytest.approx(dense, rel=1e-9)
    with pytest.raises(ValueError, match="tune the prior"):
        penalty_shares(post.with_delta(delta))


def test_bench_gradient_term_equals_dense():
    """bench.priors.gradient_log_z: 1/2 g^T (H + lambda)^-1 g - lambda g^T (H + lambda)^-1 delta
    with H = A (x) G, low-rank sides included (h = 0 outside the kept ranks)."""
    from bench.priors import gradient_log_z

    model, mods = trained_case()
    post = fit_kfac(model, [llama_batch([4, 6, 5], seed=1)], llama_logits_fn(2), mods,
                    max_dense=3, rank=2)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    delta = {
        n: torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) for n, m in mods.items()
    }
    grad = {
        n: torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) for n, m in mods.items()
    }
    tuned = post.with_delta(delta).with_prior(0.3)
    expected = 0.0
    for n, m in tuned.modules.items():
        H = torch.kron(m.a.dense(), m.g.dense())
        inv = torch.linalg.inv(H + 0.3 * torch.eye(H.shape[0], dtype=torch.float64))
        g, d = grad[n].T.reshape(-1), delta[n].T.reshape(-1)
        expected += 0.5 * float(g @ inv @ g) - 0.3 * float(g @ inv @ d)
    assert gradient_log_z(tuned, grad, delta) == pytest.approx(expected, rel=1e-9)
