"""Fine-tuning: an interrupted run resumes to the same adapter; exported adapters load in PEFT."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lalora.config import DataConfig, FinetuneConfig, ModelCard
from lalora.data.datasets import load_splits
from lalora.models.adapters import attach_lora, load_adapter
from lalora.models.classifier import answer_token_ids
from lalora.models.zoo import load_card_model
from lalora.training.finetune import (
    RunContext,
    Task,
    latest_checkpoint,
    parameter_groups,
    train,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))

CARD = ModelCard(source="tiny", arch="llama", targets=("q_proj", "v_proj"), lm_head=True)
CFG = FinetuneConfig(lr=1e-3, batch_size=3, steps=6, save_every=2, max_length=64, seed=1)


class Interrupt(Exception):
    pass


def fresh():
    tok, base = load_card_model(CARD, seed=0)
    return tok, attach_lora(base, CARD, seed=0)


def run(out: Path, stop_at: int | None = None, cfg: FinetuneConfig = CFG):
    tok, model = fresh()
    train_ex, _ = load_splits(DataConfig(name="generated", n_train=20, n_test=5, val_size=0))

    def on_step(step: int) -> None:
        if step == stop_at:
            raise Interrupt

    task = Task(model, tok, train_ex, answer_token_ids(tok, (" A", " B")))
    return model, train(task, cfg, RunContext(out, "run-1", progress=False, on_step=on_step))


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
    # the resumed call ran steps 5 and 6 only; its wall time covers them alone
    assert (full.steps_run, resumed.steps_run) == (6, 2)
    assert full.seconds > 0 and resumed.seconds > 0 and full.cpu_seconds > 0
    _, again = run(tmp_path / "resumed")
    assert again.steps_run == 0 and again.losses == full.losses


def test_usage_reports_the_steps_run_their_time_and_the_peak_memory(tmp_path):
    """The finetune stage's metrics file: seconds per step over the steps this process ran and
    its peak resident memory, at least what it holds now."""
    import psutil

    from lalora.training.recipe import Finetuned, usage

    model, result = run(tmp_path / "run")
    got = usage(Finetuned(None, model, None, result))
    assert got["steps_run"] == 6 and got["device"] == "cpu" and got["processes"] == 1
    assert got["s_per_step"] == pytest.approx(result.seconds / 6, abs=1e-4)
    assert got["peak_host_gb"] >= psutil.Process().memory_info().rss / 2**30 - 1e-3
    assert got["peak_gpu_gb"] is None and got["cpu_s"] == pytest.approx(
        result.cpu_seconds, abs=1e-3
    )
    _, resumed = run(tmp_path / "run")
    assert usage(Finetuned(None, model, None, resumed))["s_per_step"] is None


def test_lora_plus_trains_b_at_ratio_times_lr_and_resumes_exactly(tmp_path):
    """LoRA+ (Hayou et al. 2024): two AdamW groups, A at lr and B at 16 lr, through the schedule
    and across a resume."""
    cfg = replace(CFG, lora_plus_ratio=16.0)
    _, model = fresh()
    groups = parameter_groups(model, cfg.lr, cfg.lora_plus_ratio)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [cfg.lr, 16 * cfg.lr]
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(trainable)
    (only,) = parameter_groups(model, cfg.lr, 1.0)
    assert [names[id(p)] for p in only["params"]] == trainable  # today's single group

    _, full = run(tmp_path / "full", cfg=cfg)
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", stop_at=5, cfg=cfg)
    _, resumed = run(tmp_path / "resumed", cfg=cfg)
    for step in cfg.checkpoints:
        a, b = adapter(tmp_path / "full", step), adapter(tmp_path / "resumed", step)
        assert all(torch.equal(a[k], b[k]) for k in a), step
    assert resumed.losses == full.losses
    meta = json.loads((tmp_path / "full" / "step-4" / "trainer.json").read_text())
    lrs = [g["lr"] for g in meta["optimizer"]["param_groups"]]
    # the linear schedule at step 4 of 6 scales both groups alike
    assert lrs == pytest.approx([cfg.lr * 2 / 6, 16 * cfg.lr * 2 / 6], rel=1e-12)
    run(tmp_path / "plain")
    b_plus = {k: v for k, v in adapter(tmp_path / "full", 6).items() if "lora_B" in k}
    assert not all(torch.equal(v, adapter(tmp_path / "plain", 6)[k]) for k, v in b_plus.items())


def test_lora_plus_groups_agree_with_peft(tmp_path):
    """Every trainable weight gets the learning rate PEFT's LoRA+ optimizer gives it
    (``peft.optimizers.create_loraplus_optimizer``, the reference implementation's port)."""
    from peft.optimizers import create_loraplus_optimizer

    _, model = fresh()
    ours = {id(p): g["lr"] for g in parameter_groups(model, 1e-3, 16.0) for p in g["params"]}
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    theirs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert ours == theirs and sorted(set(ours.values())) == [1e-3, 16e-3]


def test_ratio_one_is_plain_lora_byte_for_byte(tmp_path, monkeypatch):
    """finetune.lora_plus_ratio 1 writes the checkpoints of AdamW over the flat list of LoRA
    weights (the optimizer before LoRA+ existed), to the byte."""
    run(tmp_path / "ratio1")
    monkeypatch.setattr(
        "lalora.training.finetune.parameter_groups",
        lambda model, lr, ratio: [p for p in model.parameters() if p.requires_grad],
    )
    run(tmp_path / "flat")
    for step in CFG.checkpoints:
        for name in ("adapter/adapter_model.safetensors", "trainer.safetensors", "trainer.json"):
            a = (tmp_path / "ratio1" / f"step-{step}" / name).read_bytes()
            assert a == (tmp_path / "flat" / f"step-{step}" / name).read_bytes(), (step, name)


def test_foreign_checkpoints_are_moved_aside_not_deleted(tmp_path):
    with pytest.raises(Interrupt):
        run(tmp_path / "c", stop_at=3)
    assert latest_checkpoint(tmp_path / "c", "another-config") is None
    assert not (tmp_path / "c").exists()
    assert (tmp_path / "c.stale-run-1" / "step-2" / "trainer.json").exists()


def test_export_gives_a_peft_folder_that_loads(tmp_path):
    from lalora.training.export import export_adapter

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
