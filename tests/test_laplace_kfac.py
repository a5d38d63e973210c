"""Kronecker factors against dense GGN blocks, curvlinops, and invariances (method.md 7)."""

from __future__ import annotations

import pytest
import torch
from cases import (
    XBatch,
    dense_ggn,
    dense_jacobian,
    llama_batch,
    llama_case,
    llama_logits_fn,
    mlp_case,
    mlp_logits,
    report_close,
)

from lalora.laplace import fit_kfac
from lalora.laplace.kfac import exact_fisher_root, fisher_root
from lalora.models.adapters import lora_modules


def mlp_data(n: int, C: int, seed: int = 1) -> XBatch:
    gen = torch.Generator().manual_seed(seed)
    return XBatch(
        torch.randn(n, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, C, (n,), generator=gen),
    )


def split(b: XBatch, sizes: list[int]) -> list[XBatch]:
    out, start = [], 0
    for s in sizes:
        out.append(XBatch(b.x[start : start + s], b.labels[start : start + s]))
        start += s
    return out


def full_factors(post, name):
    m = post.modules[name]
    return m.a.dense(), m.g.dense()


@pytest.mark.parametrize("C", [2, 4])
def test_exact_fisher_root_squares_to_softmax_hessian(C):
    logits = torch.randn(7, C, dtype=torch.float64)
    S = exact_fisher_root(logits)
    assert S.shape == (7, C, C - 1)
    p = torch.softmax(logits, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    report_close(S @ S.transpose(1, 2), lam, atol=1e-14)


@pytest.mark.parametrize("C", [2, 4])
def test_one_datum_kfac_equals_ggn_block(C):
    """With one datum and T = 1, A (x) G is the exact GGN block of each module."""
    model = mlp_case(C=C)
    mods = lora_modules(model)
    batch = mlp_data(1, C)
    post = fit_kfac(model, [batch], mlp_logits, mods, max_dense=10**6)
    names = list(mods)
    J = dense_jacobian(model, batch, mlp_logits, names)
    ggn = dense_ggn(J, model(batch.x).detach())
    start = 0
    for name in names:
        A, G = full_factors(post, name)
        P = A.shape[0] * G.shape[0]
        block = ggn[start : start + P, start : start + P]
        start += P
        # torch weights are row-major (d_out, d_in): vec_row(W) ordering gives G (x) A
        report_close(torch.kron(G, A), block, atol=1e-12)


@pytest.mark.parametrize("C", [2, 4])
def test_factors_equal_curvlinops_type2_expand(C):
    """Ours (C - 1 passes) against curvlinops' KFAC (C passes, type-2, expand, sum loss)."""
    from curvlinops import KFACLinearOperator

    model = llama_case()
    mods = lora_modules(model)
    logits_fn = llama_logits_fn(C)
    batches = [llama_batch([6, 6, 6], C=C, seed=s) for s in range(2)]
    post = fit_kfac(model, batches, logits_fn, mods, max_dense=10**6)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, ids):
            from lalora.models.classifier import Batch

            return logits_fn(self.net, Batch(ids, torch.ones_like(ids), torch.zeros(len(ids))))

    clf = Classifier()
    params = [m.weight for m in mods.values()]
    for p in params:
        p.requires_grad_(True)
    kfac = KFACLinearOperator(
        clf,
        torch.nn.CrossEntropyLoss(reduction="sum"),
        params,
        [(b.input_ids, b.labels) for b in batches],
        fisher_type="type-2",
        kfac_approx="expand",
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    for name in mods:
        A, G = full_factors(post, name)
        report_close(A, kfac._input_covariances[f"net.{name}"], rtol=1e-9, atol=1e-12)
        report_close(G, kfac._gradient_covariances[f"net.{name}"], rtol=1e-9, atol=1e-12)


def test_batch_invariance_and_repetition():
    model = mlp_case(C=4)
    mods = lora_modules(model)
    data = mlp_data(12, 4)
    whole = fit_kfac(model, [data], mlp_logits, mods, max_dense=10**6)
    parts = fit_kfac(model, split(data, [5, 4, 3]), mlp_logits, mods, max_dense=10**6)
    rep = fit_kfac(model, [data, data, data], mlp_logits, mods, max_dense=10**6)
    for name in mods:
        A1, G1 = full_factors(whole, name)
        A2, G2 = full_factors(parts, name)
        A3, G3 = full_factors(rep, name)
        report_close(A2, A1)
        report_close(G2, G1)
        # a datum repeated k times scales A (x) G by k (A is a mean, G a sum)
        report_close(torch.kron(A3, G3), 3 * torch.kron(A1, G1), atol=1e-11)
    assert rep.n_data == 36


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_one_pass_fishers_are_outer_products_of_loss_gradients(fisher):
    logits = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    v = fisher_root(logits, labels, fisher, torch.Generator().manual_seed(0))
    assert v.shape == (5, 3, 1)
    if fisher == "empirical":  # the gradient of the cross-entropy w.r.t. the logits
        g = torch.func.grad(
            lambda f: torch.nn.functional.cross_entropy(f, labels, reduction="sum")
        )(logits)
        report_close(v[:, :, 0], g)


def test_padding_contributes_nothing_left_or_right():
    model = llama_case()
    mods = lora_modules(model)
    fn = llama_logits_fn(2)
    lengths = [3, 7, 5]
    right = llama_batch(lengths, seed=3, padding_side="right")
    left = llama_batch(lengths, seed=3, padding_side="left")
    singles = [llama_batch([n], seed=0) for n in lengths]
    for i, _n in enumerate(lengths):  # the same sequences, one per batch, no padding
        sl = right.attention_mask[i].bool()
        singles[i] = type(right)(
            right.input_ids[i : i + 1, sl],
            right.attention_mask[i : i + 1, sl],
            right.labels[i : i + 1],
        )
    p_right = fit_kfac(model, [right], fn, mods, max_dense=10**6)
    p_left = fit_kfac(model, [left], fn, mods, max_dense=10**6)
    p_single = fit_kfac(model, singles, fn, mods, max_dense=10**6)
    for name in mods:
        for other in (p_left, p_single):
            A1, G1 = full_factors(p_right, name)
            A2, G2 = full_factors(other, name)
            report_close(A2, A1, atol=1e-12)
            report_close(G2, G1, atol=1e-12)
        assert p_right.modules[name].n_rows in (sum(lengths), len(lengths))


@pytest.mark.parametrize("update", ["svd", "nystrom"])
def test_zero_gradients_give_valid_factors(update):
    """At step 0 LoRA B is zero, so every LoRA-A output gradient is zero."""
    model = llama_case()
    mods = lora_modules(model)
    with torch.no_grad():
        for name, m in mods.items():
            if ".lora_B." in name:
                m.weight.zero_()
    post = fit_kfac(
        model, [llama_batch([4, 6])], llama_logits_fn(2), mods, rank=2, max_dense=3, update=update
    )
    for name, m in post.modules.items():
        for f in (m.a, m.g):
            assert torch.isfinite(f.evals).all() and torch.isfinite(f.evecs).all()
        if ".lora_A." in name:
            assert float(m.g.evals.abs().max()) == 0.0


def test_lora_a_maps_reading_one_input_share_one_factor(tmp_path):
    """q_proj and v_proj LoRA-A read the same hidden states: one input factor, stored once."""
    import json

    from lalora.laplace.posterior import Posterior

    model = llama_case()
    mods = lora_modules(model)
    batches = [llama_batch([4, 6], seed=1), llama_batch([5, 3], seed=2)]
    post = fit_kfac(model, batches, llama_logits_fn(2), mods, max_dense=10**6)
    prefix = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_A.default"
    for layer in range(2):
        q, v = (post.modules[prefix.format(layer, p)] for p in ("q", "v"))
        assert q.a is v.a and q.n_rows == v.n_rows == 18
        assert q.g is not v.g
    # the shared factor is the one each module would get alone
    alone = fit_kfac(model, batches, llama_logits_fn(2), {"q": mods[prefix.format(0, "q")]})
    report_close(post.modules[prefix.format(0, "q")].a.dense(), alone.modules["q"].a.dense())
    post.save(tmp_path)
    meta = json.loads((tmp_path / "posterior.json").read_text())
    assert sorted(meta["same_as"]) == [prefix.format(i, "v") + "/a" for i in range(2)]
    loaded = Posterior.load(tmp_path)
    q, v = (loaded.modules[prefix.format(1, p)] for p in ("q", "v"))
    assert q.a is v.a and torch.equal(q.a.evecs, post.modules[prefix.format(1, "q")].a.evecs)


def _captured_inputs(model, mods, batch, fn):
    """Each module's raw input (B, T, d_in) in one forward pass."""
    seen, handles = {}, []

    def keep(name):
        def hook(_m, inputs, _out):
            seen.setdefault(name, inputs[0])

        return hook

    for name, m in mods.items():
        handles.append(m.register_forward_hook(keep(name)))
    with torch.no_grad():
        fn(model, batch)
    for h in handles:
        h.remove()
    return {n: (x[:, None, :] if x.ndim == 2 else x).detach().double() for n, x in seen.items()}


@pytest.mark.parametrize("normalisation", ["rows", "sequences", "sequences_padded"])
def test_input_factor_normalisations_equal_dense_sums(normalisation):
    """A_m from every row of a left-padded batch: / non-padding rows, / sequences, or padding
    rows included / sequences (the paper's code); G_m and lm_head (one row per sequence)
    are the same for all three."""
    model = llama_case()
    mods = lora_modules(model)
    fn = llama_logits_fn(2)
    batches = [llama_batch([3, 7, 5], seed=3, padding_side="left"), llama_batch([6, 2], seed=4)]
    post = fit_kfac(model, batches, fn, mods, max_dense=10**6, normalisation=normalisation)
    rows_post = fit_kfac(model, batches, fn, mods, max_dense=10**6)
    n_seq = 5
    sums, n_rows = {}, {}
    for b in batches:
        for name, x in _captured_inputs(model, mods, b, fn).items():
            if x.shape[1] == b.attention_mask.shape[1] and normalisation != "sequences_padded":
                x = x * b.attention_mask[:, :, None].double()
                rows = int(b.attention_mask.sum())
            else:
                rows = x.shape[0] * x.shape[1]
            flat = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + flat.T @ flat
            n_rows[name] = n_rows.get(name, 0) + rows
    for name in mods:
        divisor = n_rows[name] if normalisation == "rows" else n_seq
        A, G = full_factors(post, name)
        report_close(A, sums[name] / divisor, atol=1e-12)
        report_close(G, full_factors(rows_post, name)[1], atol=1e-12)
        if ".lm_head." in name:
            report_close(A, full_factors(rows_post, name)[0], atol=1e-12)
        elif normalisation != "rows":  # the attention maps' factor: about T times larger
            ratio = float(A.trace() / full_factors(rows_post, name)[0].trace())
            assert ratio > 2.5
    assert post.normalisation == normalisation
    assert post.train_confidence > 0.5 and 0 < post.fisher_trace < 5 * 0.5


def _dense_linear_evidence(m, lam, delta):
    """-1/2 delta^T (lambda H (H + lambda)^-1) delta - 1/2 log det(I + H / lambda), H = A (x) G
    (column-major vec), from dense matrices."""
    H = torch.kron(m.a.dense(), m.g.dense())
    v = delta.double().T.reshape(-1)  # column-major vec of (d_out, d_in)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    penalty = lam * float(v @ (H @ torch.linalg.solve(H + lam * eye, v)))
    return -0.5 * penalty - 0.5 * float(torch.linalg.slogdet(eye + H / lam)[1])


@pytest.mark.parametrize("dense", [True, False])
def test_linear_evidence_equals_dense_formula(dense):
    """The Kronecker eigenbasis form of the linearised evidence, dense and low-rank factors."""
    from lalora.laplace.marglik import module_evidence

    model = llama_case()
    mods = lora_modules(model)
    kw = {"max_dense": 10**6} if dense else {"max_dense": 3, "rank": 2}
    post = fit_kfac(model, [llama_batch([4, 6, 5], seed=1)], llama_logits_fn(2), mods, **kw)
    gen = torch.Generator().manual_seed(0)
    delta = {
        n: torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) for n, m in mods.items()
    }
    centred = post.with_delta(delta)
    for name, m in centred.modules.items():
        for lam in (0.01, 1.0, 30.0):
            assert module_evidence(m, lam, "linear") == pytest.approx(
                _dense_linear_evidence(m, lam, delta[name]), rel=1e-9, abs=1e-10
            )
        assert m.theta_sq == pytest.approx(float(delta[name].pow(2).sum()))
    with pytest.raises(ValueError, match="with_delta"):
        module_evidence(post.with_theta_sq({n: 1.0 for n in mods}).modules[name], 1.0, "linear")


@pytest.mark.parametrize("C", [2, 4])
def test_one_datum_log_z_equals_exact_block(C):
    """With one datum and T = 1 the Kronecker posterior is the exact block-diagonal GGN: its
    standard and linearised evidences equal the data-space ones, whatever the prior mean."""
    from lalora.laplace import exact
    from lalora.laplace.marglik import log_marginal_likelihood

    model = mlp_case(C=C)
    mods = lora_modules(model)
    batch = mlp_data(1, C)
    mean = {n: 0.2 * torch.ones_like(m.weight) for n, m in mods.items()}
    post = fit_kfac(model, [batch], mlp_logits, mods, max_dense=10**6)
    post = post.with_delta({n: m.weight.detach() - mean[n] for n, m in mods.items()})
    dual = exact.dual_ggn(model, [batch], [batch], mlp_logits, mods, prior_mean=mean)
    lam = {n: 0.3 + i for i, n in enumerate(mods)}
    for evidence in ("standard", "linear"):
        assert log_marginal_likelihood(post, lam, evidence) == pytest.approx(
            exact.log_marginal_likelihood(dual, lam, "block", evidence), rel=1e-9
        )


def test_renormalise_equals_a_sequences_fit():
    from lalora.laplace.kfac import renormalise

    model = llama_case()
    mods = lora_modules(model)
    fn = llama_logits_fn(2)
    batches = [llama_batch([3, 7, 5], seed=3), llama_batch([6, 2], seed=4)]
    rows = fit_kfac(model, batches, fn, mods, max_dense=10**6)
    seq = fit_kfac(model, batches, fn, mods, max_dense=10**6, normalisation="sequences")
    again = renormalise(rows, "sequences")
    assert again.normalisation == "sequences"
    for name in mods:
        report_close(again.modules[name].a.dense(), seq.modules[name].a.dense(), atol=1e-12)
    q, v = (n for n in mods if ".q_proj.lora_A." in n), (n for n in mods if ".v_proj.lora_A." in n)
    assert again.modules[next(q)].a is again.modules[next(v)].a  # still one shared factor
    with pytest.raises(ValueError, match="padding rows"):
        renormalise(rows, "sequences_padded")
