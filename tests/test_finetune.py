"""Fine-tuning: an interrupted run resumes to the same adapter; exported adapters load in PEFT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lalora.adapters import attach_lora, load_adapter
from lalora.classifier import answer_token_ids
from lalora.config import DataConfig, FinetuneConfig, ModelCard
from lalora.data import load_splits
from lalora.finetune import latest_checkpoint, train
from lalora.zoo import load_card_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))

CARD = ModelCard(source="tiny", arch="llama", targets=("q_proj", "v_proj"), lm_head=True)
CFG = FinetuneConfig(lr=1e-3, batch_size=3, steps=6, save_every=2, max_length=64, seed=1)


class Interrupt(Exception):
    pass


def fresh():
    tok, base = load_card_model(CARD, seed=0)
    return tok, attach_lora(base, CARD, seed=0)


def run(out: Path, stop_at: int | None = None):
    tok, model = fresh()
    train_ex, _ = load_splits(DataConfig(name="generated", n_train=20, n_test=5, val_size=0))

    def on_step(step: int) -> None:
        if step == stop_at:
            raise Interrupt

    return model, train(
        model,
        tok,
        train_ex,
        answer_token_ids(tok, (" A", " B")),
        CFG,
        out,
        "run-1",
        on_step=on_step,
        progress=False,
    )


def adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"step-{step}" / "adapter" / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    _, full = run(tmp_path / "full")
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", stop_at=5)  # dies between checkpoints 4 and 6
    assert latest_checkpoint(tmp_path / "resumed", "run-1") == 4
    _, resumed = run(tmp_path / "resumed")
    for step in CFG.checkpoints:
        a, b = adapter(tmp_path / "full", step), adapter(tmp_path / "resumed", step)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    assert resumed.losses == full.losses
    start, end = adapter(tmp_path / "full", 0), adapter(tmp_path / "full", 6)
    assert not all(torch.equal(start[k], end[k]) for k in start)


def test_foreign_checkpoints_are_moved_aside_not_deleted(tmp_path):
    with pytest.raises(Interrupt):
        run(tmp_path / "c", stop_at=3)
    assert latest_checkpoint(tmp_path / "c", "another-config") is None
    assert not (tmp_path / "c").exists()
    assert (tmp_path / "c.stale-run-1" / "step-2" / "trainer.json").exists()


def test_export_gives_a_peft_folder_that_loads(tmp_path):
    from lalora.export import export_adapter

    model, _ = run(tmp_path / "c")
    export_adapter(tmp_path / "c", 6, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    _, base = load_card_model(CARD, seed=0)
    loaded = load_adapter(base, tmp_path / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, trained[n])
