"""The data-space full-GGN Laplace against the dense P x P GGN built with torch.func."""

from __future__ import annotations

import math

import pytest
import torch
from cases import dense_ggn, dense_jacobian, llama_batch, llama_case, llama_logits_fn, report_close

from lalora.laplace import exact
from lalora.laplace.predictive import contrast_matrix
from lalora.models.adapters import lora_modules


def setup(C: int):
    model = llama_case()
    mods = lora_modules(model)
    fn = llama_logits_fn(C)
    train = [llama_batch([5, 7, 4], C=C, seed=s) for s in range(3)]
    test = [llama_batch([6, 3, 8], C=C, seed=11)]
    mean = {n: 0.3 * torch.randn_like(m.weight) for n, m in mods.items()}
    dual = exact.dual_ggn(model, train, test, fn, mods, prior_mean=mean)
    return model, mods, fn, train, test, mean, dual


def dense_reference(model, mods, fn, train, test, mean, lam_by_module, block: bool):
    """Dense log Z and D J* Sigma J*^T D^T with the (P, P) GGN and a diagonal prior."""
    names = list(mods)
    H, loglik = 0, 0.0
    for b in train:
        J = dense_jacobian(model, b, fn, names)  # (B, C, P)
        logits = fn(model, b).detach().double()
        H = H + dense_ggn(J, logits)
        loglik += float(torch.log_softmax(logits, -1).gather(1, b.labels[:, None]).sum())
    sizes = [mods[n].weight.numel() for n in names]
    lam = torch.cat(
        [
            torch.full((s,), lam_by_module[n], dtype=torch.float64)
            for n, s in zip(names, sizes, strict=True)
        ]
    ).double()
    if block:  # keep only the within-module blocks
        mask = torch.block_diag(*[torch.ones(s, s) for s in sizes]).bool()
        H = torch.where(mask, H, torch.zeros_like(H))
    theta = torch.cat([(mods[n].weight.detach() - mean[n]).flatten() for n in names]).double()
    prec = H + torch.diag(lam)
    log_z = (
        loglik
        - 0.5 * float((lam * theta**2).sum())
        + 0.5 * float(lam.log().sum())
        - 0.5 * float(torch.linalg.slogdet(prec)[1])
    )
    Jt = torch.cat([dense_jacobian(model, b, fn, names) for b in test])  # (M, C, P)
    C = Jt.shape[1]
    D = contrast_matrix(C)
    cov = D @ Jt @ torch.linalg.inv(prec) @ Jt.transpose(1, 2) @ D.T
    return log_z, cov


@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("structure", ["full", "block"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_log_z_and_covariance_equal_dense(C, structure, layerwise):
    model, mods, fn, train, test, mean, dual = setup(C)
    gen = torch.Generator().manual_seed(1)
    names = list(mods)
    lam = {
        n: float(10 ** (2 * torch.rand(1, generator=gen) - 1)) if layerwise else 0.7 for n in names
    }
    log_z, cov = dense_reference(model, mods, fn, train, test, mean, lam, structure == "block")
    assert exact.log_marginal_likelihood(dual, lam, structure) == pytest.approx(log_z, rel=1e-10)
    report_close(exact.logit_covariance(dual, lam, structure), cov, rtol=1e-8, atol=1e-12)


def test_block_and_full_differ_and_tuned_prior_is_a_stationary_point():
    *_, dual = setup(2)
    lam = exact.tune_prior(dual, "full", log10_min=-6, log10_max=8)
    h = 1e-4
    up = exact.log_marginal_likelihood(dual, lam * math.exp(h))
    down = exact.log_marginal_likelihood(dual, lam * math.exp(-h))
    assert abs((up - down) / (2 * h)) < 1e-4
    # MacKay's fixed point: lambda ||theta - mu||^2 = effective dimension
    gamma = exact.effective_dimension(dual, lam)
    assert lam * float(dual.theta_sq.sum()) == pytest.approx(gamma, rel=1e-5)
    assert exact.log_marginal_likelihood(dual, 1.0, "block") != pytest.approx(
        exact.log_marginal_likelihood(dual, 1.0, "full"), rel=1e-6
    )


def _dense_parts(model, mods, fn, train, mean):
    """Dense J (N, C, P), MAP logits (N, C), labels and delta = theta* - mu (P,)."""
    names = list(mods)
    J = torch.cat([dense_jacobian(model, b, fn, names) for b in train])
    logits = torch.cat([fn(model, b).detach().double() for b in train])
    labels = torch.cat([b.labels for b in train])
    delta = torch.cat([(mods[n].weight.detach() - mean[n]).flatten() for n in names]).double()
    return J, logits, labels, delta


def _prior_diag(mods, lam_by_module):
    return torch.cat(
        [
            torch.full((m.weight.numel(),), lam_by_module[n], dtype=torch.float64)
            for n, m in mods.items()
        ]
    )


@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("structure", ["full", "block"])
def test_linear_evidence_equals_dense(C, structure):
    """Quadratic data term at theta*, integrated against the prior: the penalty
    delta^T (Lambda_0 - Lambda_0 (H + Lambda_0)^-1 Lambda_0) delta replaces lambda ||delta||^2."""
    model, mods, fn, train, _test, mean, dual = setup(C)
    gen = torch.Generator().manual_seed(2)
    lam = {n: float(10 ** (2 * torch.rand(1, generator=gen) - 1)) for n in mods}
    J, logits, labels, delta = _dense_parts(model, mods, fn, train, mean)
    H = dense_ggn(J, logits)
    if structure == "block":
        sizes = [m.weight.numel() for m in mods.values()]
        H = torch.where(torch.block_diag(*[torch.ones(s, s) for s in sizes]).bool(), H, 0.0)
    d = _prior_diag(mods, lam)
    prec = H + torch.diag(d)
    penalty = float(delta @ (d * delta) - (d * delta) @ torch.linalg.solve(prec, d * delta))
    loglik = float(torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum())
    expected = (
        loglik
        - 0.5 * penalty
        + 0.5 * float(d.log().sum())
        - 0.5 * float(torch.linalg.slogdet(prec)[1])
    )
    got = exact.log_marginal_likelihood(dual, lam, structure, evidence="linear")
    assert got == pytest.approx(expected, rel=1e-9)
    # the data-constrained part of the penalty only: below the standard one
    assert got > exact.log_marginal_likelihood(dual, lam, structure)


@pytest.mark.parametrize("C", [2, 4])
def test_linear_model_evidence_equals_dense_newton(C):
    """The linearised model's Laplace evidence at its own mode, against Newton's method on the
    (P,) weights with the dense Jacobian."""
    model, mods, fn, train, _test, mean, dual = setup(C)
    lam = {n: 0.5 + i / 3 for i, n in enumerate(mods)}
    J, logits, labels, delta = _dense_parts(model, mods, fn, train, mean)
    d = _prior_diag(mods, lam)
    onehot = torch.nn.functional.one_hot(labels, C).double()

    def parts(u):
        f = logits + torch.einsum("ncp,p->nc", J, u)
        p = torch.softmax(f, -1)
        ll = float(torch.log_softmax(f, -1).gather(1, labels[:, None]).sum())
        W = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return (
            ll,
            torch.einsum("ncp,nc->p", J, onehot - p),
            torch.einsum("ncp,ncd,ndq->pq", J, W, J),
        )

    def objective(u):
        return parts(u)[0] - 0.5 * float((delta + u) @ (d * (delta + u)))

    u = torch.zeros_like(delta)
    for _ in range(200):  # damped Newton: halve a step that lowers the objective
        _, grad, H = parts(u)
        step = torch.linalg.solve(H + torch.diag(d), grad - d * (delta + u))
        t = 1.0
        while objective(u + t * step) < objective(u) - 1e-12 and t > 1e-8:
            t /= 2
        u = u + t * step
        if float(step.abs().max()) < 1e-12:
            break
    ll, grad, H = parts(u)
    assert float((grad - d * (delta + u)).abs().max()) < 1e-9  # a stationary point
    theta = delta + u
    expected = (
        ll
        - 0.5 * float(theta @ (d * theta))
        + 0.5 * float(d.log().sum())
        - 0.5 * float(torch.linalg.slogdet(H + torch.diag(d))[1])
    )
    mode = exact.linear_model_evidence(dual, lam)
    assert mode.log_z == pytest.approx(expected, rel=1e-9)
    assert mode.log_likelihood == pytest.approx(ll, rel=1e-9)
    # the mode beats theta* on the linearised model's log joint
    assert mode.log_likelihood - 0.5 * mode.penalty > dual.log_likelihood - 0.5 * float(
        delta @ (d * delta)
    )
