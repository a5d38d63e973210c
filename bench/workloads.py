"""What the benchmark times: a model with LoRA, prompt batches, and the phases on them.

Every phase is a function of (model, batches) so ours and the reference run on the very same
objects. The adapter's B matrices are set to small seeded random values, as after fine-tuning:
with B = 0 (PEFT's init) the gradients reaching the A matrices vanish.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lalora.config import ModelCard, load_params
from lalora.data.datasets import load_local, winogrande_prompt
from lalora.data.files import Example
from lalora.data.generated import generate_task
from lalora.laplace.kfac import fit_kfac
from lalora.laplace.predictive import predict_covariance, predictive_probs
from lalora.models.adapters import attach_lora, lora_modules
from lalora.models.classifier import Batch, answer_logits, answer_token_ids
from lalora.models.pipeline import batches, logits_fn, map_probs
from lalora.models.zoo import load_card_model

SHARED_WINOGRANDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "winogrande"
TINY = ModelCard(source="tiny", arch="llama")


@dataclass(frozen=True)
class Setup:
    """A model with LoRA, its answer ids and tokenised train/test batches."""

    model: nn.Module
    answer_ids: list[int]
    train: list[Batch]
    test: list[Batch]
    train_examples: list[Example]
    test_examples: list[Example]
    card: ModelCard


def examples(n_train: int, n_test: int) -> tuple[list[Example], list[Example], str]:
    """WinoGrande-S train and dev prompts from ``../shared/data`` when present, else the
    generated task; and the name of the source."""
    if SHARED_WINOGRANDE.is_dir():
        train = load_local("winogrande", SHARED_WINOGRANDE, "train_s")[:n_train]
        test = load_local("winogrande", SHARED_WINOGRANDE, "dev")[:n_test]
        return train, test, "WinoGrande-S train / dev"
    tr, te = generate_task(max(n_train, 20), max(n_test, 20), seed=0)
    train = [winogrande_prompt(r, f"gen {i}") for i, r in enumerate(tr[:n_train])]
    test = [winogrande_prompt(r, f"gen {i}") for i, r in enumerate(te[:n_test])]
    return train, test, "generated task"


def card_for(
    name: str,
    params_path: str = "params.yaml",
    lm_head: bool | None = None,
    dropout: float | None = None,
) -> ModelCard:
    card = TINY if name == "tiny" else load_params(params_path).card(name)
    if lm_head is not None:
        card = replace(card, lm_head=lm_head)
    if dropout is not None:
        card = replace(card, dropout=dropout)
    return card


def setup(
    card: ModelCard,
    train: list[Example],
    test: list[Example],
    batch_size: int,
    max_length: int = 512,
    seed: int = 0,
) -> Setup:
    tok, base = load_card_model(card, seed=seed)
    model = attach_lora(base, card, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            if ".lora_B." in name:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.01)
    model.eval()
    ids = answer_token_ids(tok, (" A", " B"))

    def batched(exs: list[Example]) -> list[Batch]:
        return list(batches(tok, exs, batch_size, max_length))

    return Setup(model, ids, batched(train), batched(test), train, test, card)


def synthetic_batches(vocab: int, n: int, length: int, batch_size: int, seed: int = 0):
    """Random token batches of exactly ``length`` tokens (no padding) for the scaling study."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(0, vocab, (b, length), generator=gen)
        labels = torch.randint(0, 2, (b,), generator=gen)
        out.append(Batch(ids, torch.ones_like(ids), labels))
    return out


# --------------------------------------------------------------------------------------------
# Phases (each returns what it computed, so results can be checked)


def epoch(s: Setup) -> float:
    """One fine-tuning epoch of forward and backward passes (train mode, no optimizer step)."""
    params = [p for n, p in s.model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    s.model.train()
    total = 0.0
    for b in s.train:
        loss = nn.functional.cross_entropy(answer_logits(s.model, b, s.answer_ids), b.labels)
        loss.backward()
        total += float(loss.detach())
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    s.model.eval()
    return total


def ours_fit(
    s: Setup,
    batches: list[Batch],
    rank: int,
    threshold: int,
    update: str,
    max_dense: int | None = None,
):
    """Our factors; sides >= ``threshold`` low-rank (bayesian-lora's convention), or with
    ``max_dense`` every side up to it dense (the pipeline's ``kfac.max_dense``)."""
    return fit_kfac(
        s.model,
        batches,
        logits_fn(s.answer_ids),
        lora_modules(s.model),
        "exact",
        rank,
        threshold - 1 if max_dense is None else max_dense,
        update,
    )


def ours_map(s: Setup) -> torch.Tensor:
    """MAP probabilities (N, C) over the test batches: one no-grad forward each."""
    return map_probs(s.model, s.test, s.answer_ids)


def forward_backward(s: Setup) -> float:
    """The floor's pass over the test batches: one forward with gradients and one backward of
    the logit contrast to the LoRA outputs, with no Jacobian or projection work (eval mode)."""
    from lalora.laplace.hooks import Tap, lora_grad_enabled, output_gradients

    modules = lora_modules(s.model)
    total = 0.0
    with lora_grad_enabled(modules), Tap(modules, lambda *_: None, mask_grads=False) as tap:
        for b in s.test:
            tap.mask = b.attention_mask
            logits = answer_logits(s.model, b, s.answer_ids)  # (B, 2)
            contrast = torch.tensor([1.0, -1.0])[None, :, None].expand(logits.shape[0], 2, 1)
            output_gradients(logits, contrast, tap.outputs)
            total += float(logits.detach().sum())
    return total


def ours_predictive(s: Setup, post, samples: int = 10000):
    """Laplace predictive over the test batches: probabilities (N, C), contrast cov (N, K, K)."""
    mean, cov = predict_covariance(
        s.model, s.test, logits_fn(s.answer_ids), lora_modules(s.model), post
    )
    return predictive_probs(mean, cov, "mc", samples, 0), cov


def scalar_prior(post) -> float:
    """The prior precision of a posterior tuned with a scalar prior."""
    values = set(post.prior_precision.values())
    if len(values) != 1:
        raise ValueError(f"expected one scalar prior precision, got {sorted(values)}")
    return values.pop()
