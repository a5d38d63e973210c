"""Model zoo: every card's architecture with LoRA (tiny, no download), the real SmolLM2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lalora.config import ConfigError, ModelCard, Params, compose, load_section
from lalora.core.errors import ModelError
from lalora.models.adapters import attach_lora, lora_modules
from lalora.models.classifier import answer_logits, answer_token_ids, encode
from lalora.models.zoo import load_base_model, load_card_model

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_section(Params, compose(ROOT / "conf"), "")


@pytest.mark.parametrize("name", sorted(PARAMS.zoo))
def test_every_card_attaches_lora_to_its_architecture(name):
    card = PARAMS.zoo[name]
    assert (card.r, card.alpha, card.dropout) == (8, 16.0, 0.1)  # the report's Table 1
    tiny = dataclasses.replace(card, source="tiny", quantization="none", dtype="float32")
    tok, base = load_card_model(tiny)
    model = attach_lora(base, tiny)
    expected = 0
    for mod_name, module in base.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        if leaf in card.targets or (card.lm_head and leaf == "lm_head"):
            layer = module.base_layer if hasattr(module, "base_layer") else module
            expected += card.r * (layer.in_features + layer.out_features)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert expected > 0 and trainable == expected
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_modules(model)}
    assert targeted == set(card.targets) | ({"lm_head"} if card.lm_head else set())
    batch = encode(tok, ["Question one? Answer:", "A longer question two? Answer:"], [0, 1], 64)
    assert answer_logits(model, batch, answer_token_ids(tok, (" A", " B"))).shape == (2, 2)


def test_phi3_uses_its_fused_projection():
    assert PARAMS.zoo["phi3-mini"].targets == ("qkv_proj",)


def test_four_bit_without_cuda_is_refused():
    card = PARAMS.zoo["llama2-7b"]
    assert card.quantization == "nf4"
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelError, match=r"4-bit.*needs CUDA"):
        load_base_model(card)


def test_unknown_model_is_named():
    with pytest.raises(ConfigError, match="unknown model 'gpt5'"):
        PARAMS.card("gpt5")


def test_real_smollm2_loads_offline_with_single_answer_tokens(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card: ModelCard = PARAMS.zoo["smollm2-135m"]
    tok, base = load_card_model(card)
    assert base.config.model_type == "llama" and base.dtype == torch.float32
    ids = answer_token_ids(tok, (" A", " B"))
    assert len(set(ids)) == 2
    model = attach_lora(base, card)
    batch = encode(tok, ["Is the sky blue? Choices: A. yes. B. no. Answer:"], [0], 512)
    logits = answer_logits(model, batch, ids)
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_nf4_cards_build_their_quantisation_config(monkeypatch):
    from lalora.models.zoo import quantization_kwargs

    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("llama2-7b", "llama3-8b", "phi2", "phi3-mini"):
        kwargs = quantization_kwargs(PARAMS.zoo[name])
        q = kwargs["quantization_config"]
        assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
        assert q.bnb_4bit_compute_dtype == torch.bfloat16
        assert kwargs["device_map"] == {"": 3}  # this process's GPU under torchrun
    assert quantization_kwargs(PARAMS.zoo["smollm2-135m"]) == {}


def test_concurrent_first_use_of_the_gguf_cache_writes_it_once(tmp_path):
    """Two processes (two ranks, or two queued experiments) that need the dequantised GGUF at
    the same time: one writes it under the lock, both get the same complete folder."""
    import os
    import subprocess
    import sys

    card = PARAMS.zoo["smollm2-135m"]
    code = (
        "from lalora.models.zoo import dequantised_gguf; "
        f"print(dequantised_gguf({card.package!r}, {card.gguf_file!r}))"
    )
    env = {**os.environ, "LALORA_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and (Path(outs[0]) / "config.json").exists()
    folders = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert folders == [Path(outs[0]).name]  # no second copy, no staging folder left
