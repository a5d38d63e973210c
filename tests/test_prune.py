"""Layer pruning (Gromov et al. 2024): the angular distance against a dense per-prompt
reference, the pruned model against one built with those layers deleted by hand, and
prune.layers 0 changing nothing."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from tiny_study import write_params
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

from lalora.config import ConfigError, ModelCard, load_params
from lalora.core.errors import ArtifactError
from lalora.models.adapters import attach_lora, lora_modules
from lalora.models.classifier import Batch
from lalora.models.layers import drop_layers
from lalora.models.prune import (
    NOTHING,
    angular_distances,
    choose,
    last_token_states,
    measure,
    pruned,
    read,
    write,
)
from lalora.models.zoo import load_card_model, model_config

COMMON = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
              num_attention_heads=4, max_position_embeddings=64)  # fmt: skip


def llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(num_key_value_heads=2, **COMMON)).eval()
    with torch.no_grad():  # a final norm that is not the identity: it changes angles
        model.model.norm.weight.uniform_(0.2, 3.0)
    return model


def test_distance_equals_a_dense_reference_from_output_hidden_states():
    model = llama()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 60, (int(n),), generator=gen).tolist() for n in (5, 9, 3, 7)]
    # right-padded batches of two, as the stage tokenises them
    batches = []
    for chunk in (prompts[:2], prompts[2:]):
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        batches.append(Batch(ids, mask, torch.zeros(len(chunk), dtype=torch.long)))
    states = last_token_states(model, batches)
    assert states.shape == (6, 4, 32)
    for n in (1, 2, 4):
        got = angular_distances(states, n)
        ref = []
        for l in range(5 - n + 1):
            angles = []
            for p in prompts:  # one unpadded prompt at a time
                with torch.no_grad():
                    hs = model(torch.tensor([p]), output_hidden_states=True).hidden_states
                    weight = model.model.norm.weight.detach()
                # transformers' last entry is normed; the residual stream before the final
                # RMSNorm has its direction divided by the norm's weight
                stream = [*hs[:-1], hs[-1] / weight]
                a, b = stream[l][0, -1].double(), stream[l + n][0, -1].double()
                cos = float(a @ b / (a.norm() * b.norm()))
                angles.append(math.acos(max(-1.0, min(1.0, cos))) / math.pi)
            ref.append(sum(angles) / len(angles))
        assert got.tolist() == pytest.approx(ref, abs=2e-6), n
        choice = choose(states, n)
        assert choice.start == min(range(len(ref)), key=ref.__getitem__)
        assert choice.removed == tuple(range(choice.start, choice.start + n))
    with pytest.raises(ConfigError, match=r"prune\.layers"):
        angular_distances(states, 6)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_pruned_model_equals_one_built_with_those_layers_deleted_by_hand(arch):
    if arch == "llama":
        model = llama()
        config = LlamaConfig(num_key_value_heads=2, **{**COMMON, "num_hidden_layers": 3})
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Phi3Config(pad_token_id=0, **COMMON)).eval()
        config = Phi3Config(pad_token_id=0, **{**COMMON, "num_hidden_layers": 3})
    state = model.state_dict()
    drop_layers(model, (1, 2))
    # by hand: a 3-layer model holding layers 0, 3 and 4 of the original
    new = {0: 0, 3: 1, 4: 2}
    by_hand = AutoModelForCausalLM.from_config(config).eval()
    renamed = {}
    for k, v in state.items():
        if ".layers." in k:
            i = int(k.split(".layers.")[1].split(".")[0])
            if i not in new:
                continue
            k = k.replace(f".layers.{i}.", f".layers.{new[i]}.")
        renamed[k] = v
    by_hand.load_state_dict(renamed, strict=True)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        assert torch.equal(full, by_hand(ids).logits)
        # the key-value cache: one prefix pass, then one token, as generation runs
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True)
    assert len(prefix.past_key_values.layers) == 3
    assert torch.allclose(step.logits[:, -1], full[:, -1], atol=1e-5)


def test_a_card_that_drops_layers_loads_pruned_and_lora_covers_only_the_rest():
    card = ModelCard(source="tiny", arch="llama", targets=("q_proj", "v_proj"), lm_head=True)
    tok, base = load_card_model(card, seed=0)
    tok, cut = load_card_model(replace(card, drop=(0,)), seed=0)
    assert len(cut.model.layers) == 1 == cut.config.num_hidden_layers
    assert model_config(replace(card, drop=(0,)), len(tok)).num_hidden_layers == 1
    # the kept layer is the unpruned model's layer 1, renumbered 0
    for k, v in cut.model.layers[0].state_dict().items():
        assert torch.equal(v, base.model.layers[1].state_dict()[k]), k
    adapted = {n.split(".lora_")[0] for n in lora_modules(attach_lora(cut, card, seed=0))}
    assert adapted == {"base_model.model.lm_head"} | {
        f"base_model.model.model.layers.0.self_attn.{m}" for m in ("q_proj", "v_proj")
    }
    with pytest.raises(ConfigError, match="consecutive"):
        replace(card, drop=(0, 2))


def test_zero_layers_loads_nothing_and_changes_no_card(tmp_path, monkeypatch):
    """prune.layers 0: the stage writes 'nothing removed' without loading a model, and the
    stages after it get the params unchanged (the same cards, so the same fingerprints)."""
    write_params(tmp_path)
    params = load_params(tmp_path / "params.yaml")
    assert params.prune.layers == 0

    def fail(*args, **kwargs):
        raise AssertionError("prune.layers 0 loads no model")

    monkeypatch.setattr("lalora.models.zoo.load_base_model", fail)
    monkeypatch.setattr("lalora.models.zoo.load_tokenizer", fail)
    choice = measure(params, "tiny-a", tmp_path / "absent.jsonl")
    assert choice == NOTHING
    write(choice, tmp_path / "prune.json")
    assert read(tmp_path / "prune.json") == NOTHING
    assert pruned(params, "tiny-a", tmp_path / "prune.json") == params
    assert pruned(params, "tiny-a", None) == params


def test_the_stage_s_choice_reaches_the_card_and_a_stale_one_is_refused(tmp_path):
    write_params(tmp_path, lambda p: p["prune"].update(layers=1, calibration=4))
    params = load_params(tmp_path / "params.yaml")
    (tmp_path / "data").mkdir()
    from lalora.config.data import answers_of
    from lalora.data.datasets import load_splits
    from lalora.data.files import write_split

    train, _ = load_splits(params.dataset("generated"))
    write_split(tmp_path / "data" / "train.jsonl", train[:6], answers_of(params.data["generated"]))
    choice = measure(params, "tiny-a", tmp_path / "data" / "train.jsonl")
    assert (choice.layers, choice.num_layers, choice.prompts) == (1, 2, 4)
    assert len(choice.distances) == 2 and choice.start in (0, 1)
    write(choice, tmp_path / "prune.json")
    raw = json.loads((tmp_path / "prune.json").read_text())
    assert raw["removed"] == [choice.start]
    assert pruned(params, "tiny-a", tmp_path / "prune.json").card("tiny-a").drop == (choice.start,)
    with pytest.raises(ArtifactError, match=r"prune\.layers is 0"):
        pruned(replace(params, prune=replace(params.prune, layers=0)), "tiny-a",
               tmp_path / "prune.json")  # fmt: skip
