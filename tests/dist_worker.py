"""Run under ``torchrun --nproc-per-node N`` (or plain python, N = 1) by test_distributed.py:
fine-tuning, factor fitting and evaluation of a tiny model, data parallel over the processes.

    python tests/dist_worker.py OUT [--stop-at K] [--weights ADAPTER.safetensors]

Rank 0 writes ``OUT/ckpt`` (checkpoints), ``OUT/<update>/`` (posteriors) and
``OUT/predict.safetensors`` (MAP logits, contrast covariances, MC dropout probabilities).
``--stop-at K`` makes every rank fail after step K (a killed run). ``--weights``: fit the
factors and evaluate with these LoRA weights instead of the trained ones (so that runs compare
those stages on the same model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lalora.config import DataConfig, FinetuneConfig, ModelCard
from lalora.data.datasets import load_splits
from lalora.laplace.kfac import fit_kfac
from lalora.laplace.predictive import jacobian_features, predict_covariances
from lalora.models.adapters import attach_lora, lora_modules
from lalora.models.classifier import answer_token_ids
from lalora.models.pipeline import batches, logits_fn
from lalora.models.zoo import load_card_model
from lalora.runtime.distributed import finish, init
from lalora.training.finetune import RunContext, Task, train

CARD = ModelCard(source="tiny", arch="llama", targets=("q_proj", "v_proj"), lm_head=True)
CFG = FinetuneConfig(lr=1e-3, batch_size=3, steps=6, save_every=2, max_length=64, seed=1)
DATA = DataConfig(name="generated", n_train=20, n_test=10, val_size=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--weights", type=Path)
    args = parser.parse_args()
    dist = init()
    tok, base = load_card_model(CARD, seed=0)
    model = attach_lora(base, CARD, seed=0)
    train_ex, test_ex = load_splits(DATA)
    ids = answer_token_ids(tok, (" A", " B"))

    def on_step(step: int) -> None:
        if step == args.stop_at:
            sys.exit(f"killed after step {step}")

    train(
        Task(model, tok, train_ex, ids),
        CFG,
        RunContext(args.out / "ckpt", "run-1", dist=dist, progress=False, on_step=on_step),
    )
    if args.weights is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(args.weights)))
    model.eval()
    fn, mods = logits_fn(ids), lora_modules(model)
    data = list(batches(tok, train_ex, 3, 64))  # 7 batches: shares of 4 and 3
    posts = {}
    for update in ("dense", "nystrom", "svd"):
        max_dense = 4096 if update == "dense" else 16
        post = fit_kfac(
            model, data, fn, mods, fisher="exact", rank=6, max_dense=max_dense,
            update="svd" if update == "dense" else update, dist=dist,
        )  # fmt: skip
        posts[update] = post.with_prior({n: 2.0 for n in post.modules})
        if dist.main:
            post.save(args.out / update)
    test = list(batches(tok, test_ex, 4, 64))
    mean, covs = predict_covariances(model, test, fn, mods, posts, dist=dist)
    feats = jacobian_features(model, test, fn, mods, posts["dense"], dist=dist)
    # one batch for two processes: the second one's shard is empty
    few, few_covs = predict_covariances(model, test[:1], fn, mods, posts, dist=dist)
    from lalora.models.baselines import mc_dropout_probs

    mc = mc_dropout_probs(model, test, fn, samples=2, seed=3, dist=dist)
    if dist.main:
        out = {"mean": mean, "mc": mc, "feats.mean": feats.mean, "few.mean": few}
        out |= {f"few.cov.{k}": v for k, v in few_covs.items()}
        out |= {f"cov.{k}": v for k, v in covs.items()}
        out |= {f"proj.{k}": v for k, v in feats.proj.items()}
        save_file({k: v.contiguous() for k, v in out.items()}, args.out / "predict.safetensors")
    finish(dist)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
