"""The reliability catalogue: nothing silently wrong, nothing lost, every bad input named.

One test per failure mode, each asserting the exact outcome: the error type and what its message
must name, or the file that must survive. The kill tests SIGKILL a stage in the middle of writing
its output, rerun it, and compare the final outputs byte for byte with an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lalora.config import (
    ConfigError,
    DataConfig,
    EnsembleConfig,
    EvaluateConfig,
    FinetuneConfig,
    KfacConfig,
    LaunchConfig,
    ModelCard,
    Params,
    PredictiveConfig,
    PriorConfig,
    compose,
    load_params,
    load_section,
    read_conf,
)
from lalora.core.errors import ArtifactError, ModelError, NonFiniteError
from lalora.core.io import STAGING
from lalora.core.metrics import check_finite, score
from lalora.data.datasets import load_local, load_splits
from lalora.data.files import DataError, read_jsonl
from lalora.laplace.kron import Factor
from lalora.laplace.posterior import ModuleFactors, Posterior
from lalora.models.adapters import attach_lora, load_adapter
from lalora.models.classifier import answer_token_ids
from lalora.models.zoo import load_base_model, load_card_model
from lalora.training.finetune import (
    CorruptCheckpointWarning,
    RunContext,
    Task,
    latest_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
sys.path.insert(0, str(STAGES))
TINY = {"source": "tiny", "arch": "llama", "targets": ["q_proj", "v_proj"], "lm_head": True}
CARD = ModelCard(source="tiny", arch="llama")
CFG = FinetuneConfig(lr=1e-3, batch_size=3, steps=4, save_every=2, max_length=64, seed=1)


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def stage(name: str, *args: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(STAGES / f"{name}.py"), *args, *(["--debug"] if debug else [])]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)


def prepare(params: Path, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    """The prepare stage of the generated dataset into ``cwd/data``."""
    args = ("--params", str(params), "--dataset", "generated", "--out", "data")
    return stage("prepare", *args, cwd=cwd, debug=debug)


def tiny_params(folder: Path, **edits) -> Path:
    """A params.yaml: the composed defaults with one tiny model and a short schedule."""
    raw = compose(ROOT / "conf")
    raw["models"] = ["tiny"]
    raw["zoo"] = {"tiny": TINY}
    raw["data"]["generated"].update(n_train=16, n_test=6, val_size=4)
    raw["finetune"].update(steps=4, save_every=2, batch_size=3, max_length=64, lr=1e-3)
    raw["checkpoints"] = [0, 2, 4]
    raw["kfac"].update(batch_size=6)
    raw["predictive"].update(samples=100)
    for key, value in edits.items():
        section, _, name = key.partition(".")
        if name:
            (raw["data"]["generated"] if section == "data" else raw[section])[name] = value
        else:
            raw[section] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_train(out: Path, cfg: FinetuneConfig = CFG, fingerprint: str = "run-1"):
    tok, base = load_card_model(CARD, seed=0)
    model = attach_lora(base, CARD, seed=0)
    examples, _ = load_splits(DataConfig(n_train=20, n_test=5, val_size=0))
    ids = answer_token_ids(tok, (" A", " B"))
    return train(Task(model, tok, examples, ids), cfg, RunContext(out, fingerprint, progress=False))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def staging_left(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"*{STAGING}*")]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def small_posterior() -> Posterior:
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    a = Factor(q, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    g = Factor(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64))
    return Posterior({"m.lora_A.default": ModuleFactors(a, g, 0.1, 4)}, n_data=4, fisher="exact")


# ---------------------------------------------------------------------------------------------
# 1. Non-finite numbers never pass silently


def test_finetune_stops_at_a_diverged_loss_naming_the_step(tmp_path):
    cfg = FinetuneConfig(lr=1e12, batch_size=3, steps=4, save_every=2, max_length=64, seed=1)
    with pytest.raises(NonFiniteError, match=r"step \d+ \(lr 1e\+12\).*Lower finetune\.lr"):
        tiny_train(tmp_path / "c", cfg)
    written = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert written == ["step-0"]  # nothing saved after the divergence
    # under LoRA+ the advice names the ratio that scales every B matrix's step
    plus = FinetuneConfig(lr=1e-3, batch_size=3, steps=4, save_every=2, max_length=64, seed=1,
                          lora_plus_ratio=1e15)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"Lower finetune\.lora_plus_ratio \(LoRA\+: every B "
                       r"matrix learns at 1e\+15 x lr = 1e\+12\) or finetune\.lr"):  # fmt: skip
        tiny_train(tmp_path / "plus", plus)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3])
def test_a_posterior_with_a_bad_eigenvalue_is_refused_naming_the_file(tmp_path, bad):
    post = small_posterior()
    m = post.modules["m.lora_A.default"]
    evals = m.a.evals.clone()
    evals[1] = bad
    post = Posterior(
        {"m.lora_A.default": ModuleFactors(Factor(m.a.evecs, evals), m.g, 0.1, 4)},
        n_data=4,
        fisher="exact",
    )
    post.save(tmp_path)
    kind = "negative eigenvalue" if bad < 0 else "non-finite values"
    with pytest.raises(ArtifactError, match=rf"factors\.safetensors: {kind}.*fit_kfac"):
        Posterior.load(tmp_path)


def test_export_refuses_an_adapter_with_non_finite_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from lalora.training.export import export_adapter

    out = tmp_path / "c"
    tiny_train(out)
    path = out / "step-2" / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(path))
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name][0, 0] = float("inf")
    save_file(weights, str(path))
    with pytest.raises(ArtifactError, match=rf"non-finite values in {name}.*finetune"):
        export_adapter(out, 2, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_metrics_refuse_non_finite_probabilities_and_write_no_nan():
    labels = torch.tensor([0, 1, 1])
    probs = torch.tensor([[0.9, 0.1], [float("nan"), 0.5], [0.2, 0.8]], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="index 1"):
        score(probs, labels)
    ok = score(torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]]), labels, n_bins=10)
    text = json.dumps(ok.to_dict(), allow_nan=False)  # empty bins are null, not NaN
    assert ok.bins.confidence[0] is None and '"confidence": [null' in text
    with pytest.raises(NonFiniteError, match=r"x\.json: laplace\.nll is nan"):
        check_finite({"laplace": {"nll": math.nan, "acc": 0.5}}, "x.json")


def test_aggregate_refuses_a_nan_result_naming_the_file(tmp_path):
    params = tiny_params(tmp_path, checkpoints=[0, 2, 4])
    result = {"model": "tiny", "map": {"acc": 0.5, "nll": math.nan, "ece": 0.1}}
    for step in (0, 2, 4):
        path = tmp_path / "metrics" / "checkpoints" / "tiny" / "generated" / f"step-{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "step": step}))
    res = stage(
        "aggregate", "--params", str(params), "--root", ".", "--metrics", "m", "--plots", "p",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "metrics/checkpoints/tiny/generated/step-0.json: map.nll is nan" in res.stderr
    assert not (tmp_path / "m" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# 2. Every LoRA target must match a module


@pytest.mark.parametrize(
    ("arch", "targets", "missing"),
    [("llama", ("nonexistent_proj",), "nonexistent_proj"), ("phi", ("qkv_proj",), "qkv_proj")],
)
def test_a_target_that_matches_nothing_is_refused_with_the_real_names(arch, targets, missing):
    card = ModelCard(source="tiny", arch=arch, targets=targets, lm_head=True)
    _, base = load_card_model(card)
    with pytest.raises(ModelError, match=rf"\['{missing}'\] match no linear module") as err:
        attach_lora(base, card)
    assert "q_proj" in str(err.value) and "lm_head" in str(err.value)


# ---------------------------------------------------------------------------------------------
# 3. Values that are accepted but meaningless


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("finetune", "lr", float("nan"), "finetune.lr: must be a finite number"),
        ("finetune", "lr", float("inf"), "finetune.lr: must be a finite number"),
        ("finetune", "lr", 0.0, "lr and max_length must be positive"),
        ("finetune", "weight_decay", -0.1, "weight_decay must be >= 0"),
        ("finetune", "warmup_steps", -5, "warmup_steps must be in"),
        ("data", "n_train", -1, "n_train and n_test must be >= 1"),
        ("data", "n_test", 0, "n_train and n_test must be >= 1"),
        ("data", "val_size", -1, "val_size must be >= 0"),
        ("data", "val_size", 400, r"val_size \(400\) must be smaller than n_train"),
        ("zoo", "alpha", 0.0, "alpha must be > 0"),
        ("zoo", "alpha", float("nan"), "alpha: must be a finite number"),
    ],
)
def test_meaningless_values_are_refused_naming_the_key(tmp_path, section, key, value, message):
    raw = compose(ROOT / "conf")
    if section == "zoo":
        raw["zoo"]["smollm2-135m"][key] = value
    elif section == "data":
        raw["data"]["generated"][key] = value
    else:
        raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_params(path)


def test_an_empty_model_list_is_refused(tmp_path):
    raw = compose(ROOT / "conf")
    raw["models"] = []
    with pytest.raises(ConfigError, match="models: the list is empty"):
        load_section(Params, raw, "")


@pytest.mark.parametrize("section", ["finetune", "kfac", "data", "zoo", "checkpoints"])
def test_a_missing_section_is_refused(tmp_path, section):
    raw = compose(ROOT / "conf")
    del raw[section]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"section\(s\) \['{section}'\] missing"):
        load_params(path)


def test_dataclass_defaults_are_the_composed_conf_defaults():
    """conf/ is the one place a default is written: the library's reading of it (no Hydra)
    equals Hydra's composition, and every section dataclass's defaults are its values."""
    raw = compose(ROOT / "conf")
    assert read_conf(ROOT / "conf") == raw
    assert load_section(DataConfig, raw["data"]["generated"], "data") == DataConfig()
    for key, cls in [
        ("finetune", FinetuneConfig),
        ("evaluate", EvaluateConfig),
        ("kfac", KfacConfig),
        ("prior", PriorConfig),
        ("predictive", PredictiveConfig),
        ("launch", LaunchConfig),
        ("ensemble", EnsembleConfig),
    ]:
        assert load_section(cls, raw[key], key) == cls(), key
        assert {f.name for f in dataclasses.fields(cls)} == set(raw[key]), key


def test_a_default_written_in_code_and_in_conf_is_refused():
    from lalora.config.base import _conf_defaults

    with pytest.raises(TypeError, match=r"Twice\.lr: a default in code and in conf/"):

        @_conf_defaults("finetune")
        class Twice:
            lr: float = 1.0


def test_an_empty_training_file_and_a_null_option_are_named(tmp_path):
    (tmp_path / "train_s.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train_s\.jsonl: no examples"):
        load_local("winogrande", tmp_path, "train_s")
    record = {"sentence": "The _ is big.", "option1": None, "option2": "cat", "answer": "1"}
    (tmp_path / "dev.jsonl").write_text("\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"dev\.jsonl:2: field 'option1' must be a non-empty"):
        load_local("winogrande", tmp_path, "dev")


# ---------------------------------------------------------------------------------------------
# 4. Names that become paths


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(models=["../../.."]), r"models: '\.\./\.\./\.\.' is not a plain name"),
        (lambda r: r["zoo"].update({"a/b": r["zoo"]["smollm2-135m"]}), "zoo.a/b"),
        (lambda r: r["data"]["generated"].update(train_split="../secret"), "train_split"),
        (lambda r: r["data"]["generated"].update(name="x/y"), "name: 'x/y' is not a plain name"),
        (lambda r: r.update(datasets=["../d"]), r"datasets: '\.\./d' is not a plain name"),
        (lambda r: r["data"].update({"a/b": r["data"]["generated"]}), "data.a/b"),
        (
            lambda r: r["data"]["generated"].update(source="local", local_dir="no/such/folder"),
            "data.generated.local_dir: 'no/such/folder' is not a folder",
        ),
    ],
)
def test_names_and_folders_are_checked_at_load(tmp_path, edit, message):
    raw = compose(ROOT / "conf")
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_params(path)


# ---------------------------------------------------------------------------------------------
# 5-6. Nothing the program did not write is deleted; no staging folder survives


def test_a_changed_configuration_moves_the_old_run_aside(tmp_path, capsys):
    out = tmp_path / "checkpoints"
    tiny_train(out)
    (out / "notes.txt").write_text("mine")
    before = tree_bytes(out)
    tiny_train(out, fingerprint="run-2")
    moved = tmp_path / "checkpoints.stale-run-1"
    assert tree_bytes(moved) == before  # the old run and the user's file, untouched
    assert f"moved it to {moved}" in capsys.readouterr().err
    meta = json.loads((out / "step-4" / "trainer.json").read_text())
    assert meta["fingerprint"] == "run-2"


def test_stale_staging_folders_are_removed_on_start(tmp_path, capsys):
    out = tmp_path / "checkpoints"
    tiny_train(out)
    stale = out / f".step-2{STAGING}abcd1234"
    stale.mkdir()
    (stale / "trainer.json").write_text("{")
    unrelated = out / ".step-notes"
    unrelated.mkdir()
    assert latest_checkpoint(out, "run-1") == 4
    assert not stale.exists() and unrelated.exists()
    assert "left by an interrupted checkpoint save" in capsys.readouterr().err
    dvcignore = (ROOT / ".dvcignore").read_text().splitlines()
    assert f".*{STAGING}*" in dvcignore


# ---------------------------------------------------------------------------------------------
# 8. Corrupt artifacts name the file and the stage


@pytest.mark.parametrize("name", ["trainer.safetensors", "trainer.json", "adapter_model"])
def test_a_corrupt_latest_checkpoint_resumes_from_the_last_intact_one(tmp_path, name):
    full = tmp_path / "full"
    tiny_train(full)
    out = tmp_path / "c"
    tiny_train(out)
    path = out / "step-4" / (f"adapter/{name}.safetensors" if name == "adapter_model" else name)
    truncate(path)
    with pytest.warns(CorruptCheckpointWarning, match=rf"{path.name}: unreadable"):
        assert latest_checkpoint(out, "run-1") == 2
    assert (tmp_path / "c.rejected" / "step-4").is_dir()  # moved aside, not deleted
    tiny_train(out)
    assert tree_bytes(out) == tree_bytes(full)


def test_truncated_factors_and_adapters_name_the_file_and_the_stage(tmp_path):
    from lalora.training.export import export_adapter

    small_posterior().save(tmp_path / "post")
    truncate(tmp_path / "post" / "factors.safetensors")
    with pytest.raises(ArtifactError, match=r"factors\.safetensors: unreadable.*fit_kfac"):
        Posterior.load(tmp_path / "post")
    (tmp_path / "post" / "posterior.json").write_text('{"format_version": 2')
    with pytest.raises(ArtifactError, match=r"posterior\.json: unreadable.*fit_kfac"):
        Posterior.load(tmp_path / "post")

    out = tmp_path / "c"
    tiny_train(out)
    truncate(out / "step-2" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: unreadable.*finetune"):
        export_adapter(out, 2, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    export_adapter(out, 4, tmp_path / "adapter")
    truncate(tmp_path / "adapter" / "adapter_model.safetensors", 0.9)
    _, base = load_card_model(CARD)
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: unreadable.*export"):
        load_adapter(base, tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------
# 9. Bytes that are not UTF-8


def test_a_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_bytes(b'{"a": 1}\n{"sentence": "caf\xe9 _"}\n')
    with pytest.raises(DataError, match=r"dev\.jsonl:2: not UTF-8 \(byte 0xe9 at column 18\)"):
        list(read_jsonl(path))


# ---------------------------------------------------------------------------------------------
# 10. A user error is one paragraph, not a traceback


def test_stage_errors_are_one_paragraph_and_debug_shows_the_traceback(tmp_path):
    params = tiny_params(tmp_path, **{"finetune.lr": -1.0})
    res = prepare(params, tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("prepare: error: ") and "lr and max_length must be positive" in (
        res.stderr
    )
    assert len(res.stderr.strip().splitlines()) <= 4
    res = prepare(params, tmp_path, debug=True)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


# ---------------------------------------------------------------------------------------------
# 11. A hub model that cannot be had fails at once, and never through pickle


def test_an_uncached_hub_model_offline_fails_fast_with_one_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    card = ModelCard(source="hub", repo="lalora-tests/not-cached", quantization="none")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"'lalora-tests/not-cached' is not in the HuggingFace"):
        load_card_model(card)
    assert time.perf_counter() - start < 5


def test_hub_weights_are_read_from_safetensors_only(tmp_path):
    _, base = load_card_model(CARD)
    safe = tmp_path / "safe"
    base.save_pretrained(safe)
    folder = tmp_path / "pickled"  # the same model as a pickled checkpoint only
    folder.mkdir()
    (folder / "config.json").write_bytes((safe / "config.json").read_bytes())
    torch.save(base.state_dict(), folder / "pytorch_model.bin")
    card = ModelCard(source="hub", repo=str(folder), quantization="none")
    with pytest.raises(ModelError, match="safetensors"):
        load_base_model(card)
    loaded = load_base_model(ModelCard(source="hub", repo=str(safe), quantization="none"))
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.parameters(), base.parameters(), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Kill tests: SIGKILL in the middle of a checkpoint save and of fit_kfac, rerun, same outputs

KILL_DURING = """
import os, runpy, signal, sys
import {module} as target
real = target.save_file
calls = []
def dying(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    calls.append(path)
    if len(calls) == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)  # the file is written, its folder not yet published
target.save_file = dying
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def killed_stage(name: str, module: str, nth: int, *args: str, cwd: Path):
    code = KILL_DURING.format(module=module, nth=nth)
    cmd = [sys.executable, "-c", code, str(STAGES / f"{name}.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)


def test_sigkill_during_a_checkpoint_save_and_fit_kfac_then_rerun(tmp_path):
    params = tiny_params(tmp_path)
    assert prepare(params, tmp_path).returncode == 0
    ft = ["--params", str(params), "--model", "tiny", "--data", "data/train.jsonl"]

    res = stage("finetune", *ft, "--out", "full", "--loss-csv", "full.csv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # the 2nd save_file call is step 2's trainer.safetensors: killed inside that save
    args = (*ft, "--out", "killed", "--loss-csv", "killed.csv")
    res = killed_stage("finetune", "lalora.training.finetune", 2, *args, cwd=tmp_path)
    assert res.returncode == -9, res.stderr
    assert staging_left(tmp_path / "killed"), "the kill did not hit a save"
    res = stage("finetune", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "full")
    assert (tmp_path / "killed.csv").read_text() == (tmp_path / "full.csv").read_text()
    assert not staging_left(tmp_path / "killed")

    from lalora.training.export import export_adapter

    export_adapter(tmp_path / "full", 4, tmp_path / "adapter")
    fk = ["--params", str(params), "--model", "tiny", "--adapter", "adapter"]
    fk += ["--data", "data/train.jsonl"]
    assert stage("fit_kfac", *fk, "--out", "kfac/full", cwd=tmp_path).returncode == 0
    res = killed_stage(
        "fit_kfac", "lalora.laplace.posterior", 1, *fk, "--out", "kfac/k", cwd=tmp_path
    )
    assert res.returncode == -9, res.stderr
    assert staging_left(tmp_path / "kfac") and not (tmp_path / "kfac" / "k").exists()
    res = stage("fit_kfac", *fk, "--out", "kfac/k", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert tree_bytes(tmp_path / "kfac" / "k") == tree_bytes(tmp_path / "kfac" / "full")
    assert not staging_left(tmp_path / "kfac")
