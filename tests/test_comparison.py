"""The comparison's baselines and table: temperature scaling, MC dropout, checkpoint ensemble."""

from __future__ import annotations

import pytest
import torch

from lalora.config import ModelCard
from lalora.core.io import load_predictions, save_predictions
from lalora.core.metrics import score
from lalora.models.adapters import attach_lora
from lalora.models.baselines import checkpoint_ensemble, fit_temperature, mc_dropout_probs
from lalora.models.classifier import answer_token_ids, encode
from lalora.models.pipeline import logits_fn
from lalora.models.zoo import load_card_model
from lalora.study.comparison import Predictions, compare, comparison_markdown


def test_temperature_recovers_the_generating_temperature():
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=gen).squeeze(1)
    t, edge = fit_temperature(2.5 * z, labels)  # over-confident by 2.5
    assert edge is None and t == pytest.approx(2.5, rel=0.05)
    nll = [score(torch.softmax(2.5 * z / s, 1), labels).nll for s in (t, 1.0)]
    assert nll[0] < nll[1]


def test_mc_dropout_is_seeded_varies_and_leaves_the_model_as_it_was():
    card = ModelCard(source="tiny", arch="llama", dropout=0.3)
    tok, base = load_card_model(card)
    model = attach_lora(base, card)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    fn = logits_fn(answer_token_ids(tok, (" A", " B")))
    batch = encode(tok, ["Is it? Answer:", "Which one is it? Answer:"], [0, 1], 64)
    rng = torch.get_rng_state()
    a = mc_dropout_probs(model, [batch], fn, samples=5, seed=3)
    b = mc_dropout_probs(model, [batch], fn, samples=5, seed=3)
    c = mc_dropout_probs(model, [batch], fn, samples=5, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        map_probs = torch.softmax(fn(model, batch).double(), -1)
    assert not torch.allclose(a, map_probs)
    torch.testing.assert_close(a.sum(1), torch.ones(2, dtype=a.dtype))


def test_compare_scores_every_method_and_the_checkpoint_ensemble(tmp_path):
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (50,), generator=gen)
    ids = [f"q{i}" for i in range(50)]
    preds = {}
    for step in (0, 10, 20):
        probs = {
            m: torch.softmax(torch.randn(50, 2, generator=gen, dtype=torch.float64), 1)
            for m in ("map", "la", "temperature", "laplace")
        }
        save_predictions(tmp_path / f"{step}.safetensors", probs, labels, ids, {"step": step})
        preds[("m", "d", step)] = Predictions(*load_predictions(tmp_path / f"{step}.safetensors"))
    table = compare(preds, ensemble_last=2, resamples=200)
    assert set(table.method) == {"MAP", "LA", "Temperature scaling", "Checkpoint ensemble"}
    assert (table.step == 20).all()
    ens = checkpoint_ensemble([preds[("m", "d", s)].probs["map"] for s in (10, 20)])
    row = table[(table.method == "Checkpoint ensemble") & (table.metric == "NLL")]
    assert row.value.item() == pytest.approx(score(ens, labels).nll, rel=1e-12)
    la = table[(table.method == "LA") & (table.metric == "Brier")]
    assert la.value.item() == pytest.approx(score(preds[("m", "d", 20)].probs["la"], labels).brier)
    assert "| Checkpoint ensemble |" in comparison_markdown(table, {"d": "D"})
    preds[("m", "d", 10)] = Predictions(preds[("m", "d", 10)].probs, labels, ids[::-1])
    with pytest.raises(ValueError, match="score different examples"):
        compare(preds, ensemble_last=2)


def test_deep_ensemble_averages_the_final_map_with_the_extra_runs():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (40,), generator=gen)
    ids = [f"q{i}" for i in range(40)]

    def run() -> Predictions:
        probs = torch.softmax(3 * torch.randn(40, 4, generator=gen, dtype=torch.float64), 1)
        return Predictions({"map": probs}, labels, ids)

    preds = {("m", "d", 0): run(), ("m", "d", 5): run()}
    extra = [run(), run()]
    table = compare(preds, ensemble_last=0, resamples=50, members={("m", "d"): extra})
    assert set(table.method) == {"MAP", "Deep ensemble"}
    mean = (preds[("m", "d", 5)].probs["map"] + extra[0].probs["map"] + extra[1].probs["map"]) / 3
    row = table[(table.method == "Deep ensemble") & (table.metric == "NLL")]
    assert row.value.item() == pytest.approx(score(mean, labels).nll, rel=1e-12)
    assert set(compare(preds, 0, resamples=50, members={("m", "d"): []}).method) == {"MAP"}
    shuffled = Predictions(extra[0].probs, labels, ids[::-1])
    with pytest.raises(ValueError, match="deep ensemble: the members score different"):
        compare(preds, 0, members={("m", "d"): [shuffled]})
