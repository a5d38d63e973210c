"""Marginal likelihood, prior tuning and the linearised predictive against dense formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cases import dense_jacobian, llama_batch, llama_case, llama_logits_fn, report_close

from lalora.core.search import SearchError, maximise_log10
from lalora.laplace import (
    JacobianFeatures,
    fit_kfac,
    jacobian_features,
    log_marginal_likelihood,
    logit_covariance,
    predict,
    predictive_probs,
    tune_prior,
)
from lalora.laplace.posterior import Posterior, dense_precision
from lalora.laplace.predictive import contrast_matrix, predict_covariance
from lalora.laplace.tuning import tune_prior_nll
from lalora.models.adapters import lora_modules


def setup(C: int, max_dense: int = 10**6, rank: int = 10, update: str = "svd"):
    model = llama_case()
    mods = lora_modules(model)
    fn = llama_logits_fn(C)
    train = [llama_batch([5, 7, 4], C=C, seed=s) for s in range(3)]
    post = fit_kfac(model, train, fn, mods, max_dense=max_dense, rank=rank, update=update)
    return model, mods, fn, post


def dense_log_z(post: Posterior, lam: float) -> float:
    post = post.with_prior(lam)
    logdet = sum(torch.linalg.slogdet(dense_precision(post, n))[1] for n in post.modules)
    P = post.n_params
    return post.log_likelihood - lam / 2 * post.theta_sq + P / 2 * math.log(lam) - float(logdet) / 2


@pytest.mark.parametrize(("max_dense", "update"), [(10**6, "svd"), (7, "svd"), (7, "nystrom")])
def test_log_marginal_likelihood_equals_dense(max_dense, update):
    _, _, _, post = setup(2, max_dense=max_dense, rank=3, update=update)
    for lam in (1e-2, 1.0, 37.0):
        assert log_marginal_likelihood(post, lam) == pytest.approx(
            dense_log_z(post, lam), rel=1e-10
        )


def test_tuned_prior_maximises_dense_log_z():
    _, _, _, post = setup(2)
    tuned = tune_prior(post)
    lam = next(iter(tuned.prior_precision.values()))
    best = dense_log_z(post, lam)
    for factor in (0.99, 1.01):
        assert best > dense_log_z(post, lam * factor)
    h = 1e-4  # derivative w.r.t. log lambda vanishes at the optimum
    slope = (dense_log_z(post, lam * math.exp(h)) - dense_log_z(post, lam * math.exp(-h))) / (2 * h)
    assert abs(slope) < 1e-4


def test_layerwise_prior_is_per_module_and_beats_scalar():
    _, _, _, post = setup(2)
    scalar = tune_prior(post)
    layer = tune_prior(post, structure="layerwise", log10_min=-8, log10_max=10)
    assert len(set(layer.prior_precision.values())) > 1
    assert log_marginal_likelihood(layer) >= log_marginal_likelihood(scalar) - 1e-9


def test_unbracketed_prior_search_names_where():
    _, _, _, post = setup(2)
    with pytest.raises(SearchError, match=r"checkpoint 7.*not bracketed"):
        tune_prior(post, log10_min=5.0, log10_max=6.0, grid=5, where="checkpoint 7")


@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("max_dense", [10**6, 7])
def test_predictive_covariance_equals_dense(C, max_dense):
    model, mods, fn, post = setup(C, max_dense=max_dense, rank=3)
    post = post.with_prior(0.7)
    test = llama_batch([6, 3, 8], C=C, seed=11)
    feats = jacobian_features(model, [test], fn, mods, post)
    cov = logit_covariance(feats, post)  # (N, K, K)
    names = list(mods)
    J = dense_jacobian(model, test, fn, names)  # (N, C, P), row-major per module
    blocks = []
    for n in names:
        m = post.modules[n]
        prec = torch.kron(m.g.dense(), m.a.dense()) + 0.7 * torch.eye(
            m.n_params, dtype=torch.float64
        )
        blocks.append(torch.linalg.inv(prec))
    sigma = torch.block_diag(*blocks)
    full = J @ sigma @ J.transpose(1, 2)  # (N, C, C): C full logit passes
    D = contrast_matrix(C)
    report_close(cov, D @ full @ D.T, rtol=1e-8, atol=1e-12)
    report_close(feats.mean, fn(model, test).detach(), atol=1e-12)
    # the batch-by-batch path (over two batches) gives the same
    halves = [llama_batch([6, 3], C=C, seed=11), llama_batch([8], C=C, seed=12)]
    mean2, cov2 = predict_covariance(model, halves, fn, mods, post)
    feats2 = jacobian_features(model, halves, fn, mods, post)
    report_close(cov2, logit_covariance(feats2, post), rtol=1e-10, atol=1e-14)
    report_close(mean2, feats2.mean, atol=0)
    # probabilities from the C - 1 contrasts equal those from all C logits (shift invariance)
    gen = torch.Generator().manual_seed(0)
    L = torch.linalg.cholesky(full + 1e-12 * torch.eye(C, dtype=torch.float64))
    eps = torch.randn(3, 200000, C, generator=gen, dtype=torch.float64)
    f = feats.mean[:, None, :] + torch.einsum("ncj,nsj->nsc", L, eps)
    p_full = torch.softmax(f, -1).mean(1)
    p_ours = predictive_probs(feats.mean, cov, "mc", samples=200000, seed=1)
    report_close(p_ours, p_full, atol=5e-3)


@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("max_dense", [10**6, 7])
def test_token_factor_projections_equal_those_through_the_jacobians(C, max_dense):
    """Both routes to P_c and to the part outside the kept eigenspaces agree, on every module
    (dense sides, and low-rank ones where the outside part is not zero)."""
    from lalora.laplace import predictive as pr

    model, mods, fn, post = setup(C, max_dense=max_dense, rank=3)
    test = llama_batch([6, 3, 8], C=C, seed=11)
    (m1, via_j), (m2, via_t) = (
        next(pr._contrast_pass(model, [test], fn, mods, route)) for route in (pr._never, _always)
    )
    assert torch.equal(m1, m2)
    assert all(isinstance(v, pr.TokenFactors) for v in via_t.values())
    outside = 0.0
    for n in mods:
        report_close(via_t[n].dense(), via_j[n], rtol=1e-12, atol=1e-14)
        (gj,), (gt,) = pr._groups(post, {n: via_j[n]}), pr._groups(post, {n: via_t[n]})
        (perp_j, proj_j), (perp_t, proj_t) = pr._project(gj, via_j), pr._project(gt, via_t)
        report_close(proj_t, proj_j, rtol=1e-10, atol=1e-12)
        report_close(perp_t, perp_j, rtol=1e-8, atol=1e-10)
        outside = max(outside, float(perp_j.abs().max()))
    assert (outside > 1e-6) == (max_dense == 7)


def test_token_route_is_taken_where_it_is_cheaper():
    """lm_head reads one position: its token factors are cheaper than its Jacobians; a module
    over many positions goes through J."""
    from lalora.laplace import predictive as pr

    _, mods, _, post = setup(2)
    route = pr.token_route(post)
    head = [n for n in mods if "lm_head" in n]
    assert head and all(route(n, 1) for n in head)
    assert not any(route(n, 500) for n in mods if "lm_head" not in n)


def _always(name: str, T: int) -> bool:
    return True


def test_mc_converges_to_analytic_expectation_and_probit_formula():
    mean = torch.tensor([[1.3, -0.2], [-2.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    var = torch.tensor([0.5, 4.0, 9.0], dtype=torch.float64)
    cov = var[:, None, None]
    mu = mean[:, 0] - mean[:, 1]
    x, w = np.polynomial.hermite_e.hermegauss(120)  # E[sigmoid(mu + s z)], z ~ N(0, 1)
    exact = torch.tensor(
        [
            float(np.sum(w * (1 / (1 + np.exp(-(m + math.sqrt(v) * x)))))) / math.sqrt(2 * math.pi)
            for m, v in zip(mu.tolist(), var.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    errs = [
        float((predictive_probs(mean, cov, "mc", samples=s, seed=3)[:, 0] - exact).abs().max())
        for s in (100, 10000, 1000000)
    ]
    assert errs[2] < errs[0] and errs[2] < 2e-3, errs
    probit = predictive_probs(mean, cov, "probit")
    report_close(probit[:, 0], torch.sigmoid(mu / torch.sqrt(1 + math.pi / 8 * var)), atol=1e-15)
    report_close(probit.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-15)


def test_padding_invariance_of_predictions():
    model, mods, fn, post = setup(2, max_dense=7, rank=3)
    post = post.with_prior(2.0)
    right = llama_batch([3, 8, 5], seed=5, padding_side="right")
    left = llama_batch([3, 8, 5], seed=5, padding_side="left")
    p1, c1 = predict(model, [right], fn, mods, post, link="probit")
    p2, c2 = predict(model, [left], fn, mods, post, link="probit")
    report_close(c2, c1, rtol=1e-9, atol=1e-12)
    report_close(p2, p1, atol=1e-12)


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    model, mods, fn, post = setup(4, max_dense=7, rank=3)
    post = tune_prior(post)
    post.save(tmp_path / "post")
    loaded = Posterior.load(tmp_path / "post")
    assert loaded.prior_precision == post.prior_precision
    assert loaded.n_params == post.n_params and loaded.n_data == post.n_data
    test = llama_batch([4, 6], C=4, seed=2)
    p1, c1 = predict(model, [test], fn, mods, post, samples=1000)
    p2, c2 = predict(model, [test], fn, mods, loaded, samples=1000)
    assert torch.equal(p1, p2) and torch.equal(c1, c2)


def test_validation_nll_tuning_finds_the_grid_minimum():
    from lalora.core.metrics import nll

    model, mods, fn, post = setup(2)
    val = llama_batch([5, 6, 7, 4, 6, 5, 3, 7], seed=9)
    feats = jacobian_features(model, [val], fn, mods, post)
    # an overconfident MAP (logits scaled up) that is wrong on its surest example
    feats = JacobianFeatures(mean=20 * feats.mean, perp=feats.perp, proj=feats.proj)
    margin = feats.mean[:, 0] - feats.mean[:, 1]
    labels = (margin < 0).long()  # right where the MAP is unsure, wrong where it is surest
    worst = int(margin.abs().argmax())
    labels[worst] = 1 - labels[worst]

    def val_nll(lam: float) -> float:
        p = post.with_prior(lam)
        return nll(predictive_probs(feats.mean, logit_covariance(feats, p), "probit"), labels)

    tuned, edge = tune_prior_nll(feats, labels, post, link="probit", log10_min=-6, log10_max=8)
    assert edge is None
    lam = next(iter(tuned.prior_precision.values()))
    grid = [10.0**x for x in np.linspace(-6, 8, 281)]
    assert val_nll(lam) <= min(val_nll(g) for g in grid) + 1e-12


@pytest.mark.parametrize(
    ("all_right", "edge", "log10_lam"), [(True, "high", 6.0), (False, "low", -4.0)]
)
def test_validation_nll_optimum_at_an_edge_is_recorded_with_a_warning(all_right, edge, log10_lam):
    """Right everywhere: the MAP (high edge) is best; wrong everywhere: the uniform (low edge)."""
    from lalora.laplace.marglik import PriorAtEdgeWarning

    model, mods, fn, post = setup(2)
    val = llama_batch([5, 6, 7, 4, 6, 5, 3, 7], seed=9)
    feats = jacobian_features(model, [val], fn, mods, post)
    labels = (feats.mean[:, 0] < feats.mean[:, 1]).long()  # the MAP's own answers
    if not all_right:
        labels = 1 - labels
    with pytest.warns(PriorAtEdgeWarning, match=f"checkpoint 3.*{edge} edge"):
        tuned, at = tune_prior_nll(feats, labels, post, link="probit", where="checkpoint 3")
    assert at == edge
    assert next(iter(tuned.prior_precision.values())) == pytest.approx(10.0**log10_lam)


def test_marglik_optimum_at_an_edge_raises_or_is_recorded():
    """A prior centred at theta* itself: log Z grows with lambda, the posterior is the MAP."""
    from lalora.laplace.marglik import PriorAtEdgeWarning, edges_of, squared_distances

    _, mods, _, post = setup(2)
    weights = {n: m.weight.detach() for n, m in mods.items()}
    centred = post.with_theta_sq(squared_distances(weights, weights))
    with pytest.raises(SearchError, match="not bracketed"):
        tune_prior(centred)
    for structure in ("scalar", "layerwise"):
        with pytest.warns(PriorAtEdgeWarning, match="step 0.*high edge"):
            tuned = tune_prior(centred, structure, accept_edge=True, where="step 0")
        assert edges_of(tuned.prior_precision, -4.0, 6.0) == dict.fromkeys(post.modules, "high")
    shifted = {n: w + 1.0 for n, w in weights.items()}
    sq = squared_distances(weights, shifted)
    assert sq == {n: float(w.numel()) for n, w in weights.items()}


def test_flat_objective_takes_the_largest_prior_precision():

    res = maximise_log10(lambda x: 0.0, -4.0, 6.0, 11, "flat", accept_edge=True)
    assert res.at_edge == "high" and res.log10 == 6.0


def test_rebased_features_equal_a_pass_with_the_other_factors():
    """Features of the padded-rows fit, rotated from the rows fit's, equal a Jacobian pass with
    the padded fit's own eigenbases (dense factors; lm_head's factors are the same in both)."""
    from lalora.laplace.predictive import rebase_features

    model = llama_case()
    mods = lora_modules(model)
    fn = llama_logits_fn(3)
    train = [llama_batch([5, 7, 4], C=3, seed=s) for s in range(2)]
    test = [llama_batch([6, 3, 8], C=3, seed=11)]
    rows = fit_kfac(model, train, fn, mods, max_dense=10**6)
    padded = fit_kfac(model, train, fn, mods, max_dense=10**6, normalisation="sequences_padded")
    f_rows = jacobian_features(model, test, fn, mods, rows)
    f_pad = jacobian_features(model, test, fn, mods, padded)
    rebased = rebase_features(f_rows, rows, padded)
    for name in mods:
        report_close(rebased.proj[name], f_pad.proj[name], atol=1e-10)
    lam = padded.with_prior(0.7)
    report_close(logit_covariance(rebased, lam), logit_covariance(f_pad, lam), atol=1e-10)
    low = fit_kfac(model, train, fn, mods, max_dense=3, rank=2)
    with pytest.raises(ValueError, match="low-rank"):
        rebase_features(jacobian_features(model, test, fn, mods, low), low, padded)

    # a low-rank side that is the very same in both stays; the dense side that changed rotates
    from dataclasses import replace

    old = fit_kfac(model, train, fn, mods, max_dense=20, rank=3)  # lm_head's G (32): rank 3
    head = "base_model.model.lm_head.lora_B.default"
    assert old.modules[head].g.rank < old.modules[head].g.dim
    other = old.modules["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default"].a
    new = replace(old, modules={**old.modules, head: replace(old.modules[head], a=other)})
    assert not torch.equal(other.evecs, old.modules[head].a.evecs)
    rebased = rebase_features(jacobian_features(model, test, fn, mods, old), old, new)
    direct = jacobian_features(model, test, fn, mods, new)
    report_close(rebased.proj[head], direct.proj[head], atol=1e-10)
    lam = new.with_prior(0.7)
    report_close(logit_covariance(rebased, lam), logit_covariance(direct, lam), atol=1e-10)
