"""bayesian-lora 0.0.6 (Yang et al. 2024, "Bayesian low-rank adaptation for large language
models"), called through its public functions only, on the same model and batches as ours.

Its hooks read the last position of every LoRA input and output gradient (``[:, -1]``), so its
batches are left-padded; positions are passed explicitly so its logits equal ours. It fits
factors with one Monte Carlo label per example in train mode, and its predictive takes the full
Jacobian of the answer logits with ``torch.func.jacrev`` (``jacobian_mean``) and then the
Woodbury form of the covariance per module (``variance``).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from lalora.models.classifier import Batch


def available() -> bool:
    return importlib.util.find_spec("bayesian_lora") is not None


def left_padded(batch: Batch) -> dict[str, Tensor]:
    """Model inputs with the padding moved to the left and explicit position ids."""
    mask = batch.attention_mask
    lengths = mask.sum(1)
    T = mask.shape[1]
    ids = torch.zeros_like(batch.input_ids)
    new_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        ids[i, T - n :] = batch.input_ids[i, mask[i].bool()]
        new_mask[i, T - n :] = 1
    position_ids = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": new_mask, "position_ids": position_ids}


def _last_logits(answer_ids: list[int]):
    def callback(outputs) -> Tensor:
        return outputs.logits[:, -1, answer_ids]

    return callback


def fit_factors(
    model: nn.Module, batches: list[Batch], answer_ids: list[int], rank: int, threshold: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """``calculate_kronecker_factors`` on LoRA modules: name -> (A, S), a large side kept as a
    (d, rank) root."""
    from bayesian_lora import calculate_kronecker_factors

    inputs = [left_padded(b) for b in batches]
    callback = _last_logits(answer_ids)

    def forward_call(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return callback(m(**batch))

    with _lora_trainable(model):
        return calculate_kronecker_factors(
            model,
            forward_call,
            inputs,
            n_kfac=rank,
            lr_threshold=threshold,
            target_module_keywords=["lora"],
        )


def predictive_variance(
    model: nn.Module,
    batches: list[Batch],
    answer_ids: list[int],
    factors: dict[str, tuple[Tensor, Tensor]],
    prior_precision: float,
    lora_rank: int,
    rank: int,
    threshold: int,
) -> tuple[Tensor, Tensor]:
    """MAP logits (N, C) and logit covariance (N, C, C): ``jacobian_mean`` then ``variance``."""
    from bayesian_lora import cholesky_decompose_small_factors, variance
    from bayesian_lora.main import jacobian_mean  # documented, though not in __all__

    chol = cholesky_decompose_small_factors(dict(factors), threshold, "cpu", torch.float64)
    s2 = torch.tensor(1.0 / prior_precision, dtype=torch.float64)
    means, covs = [], []
    model.eval()
    with _lora_trainable(model):
        for b in batches:
            inputs = left_padded(b)
            jac, mean = jacobian_mean(model, inputs, output_callback=_last_logits(answer_ids))
            jac = {k: v.double() for k, v in jac.items()}
            cov = variance(
                _Inputs(inputs["input_ids"]),
                jac,
                chol,
                s2,
                len(answer_ids),
                lora_rank,
                rank,
                "cpu",
            )
            means.append(mean.detach().double())
            covs.append(cov.detach().double())
    return torch.cat(means), torch.cat(covs)


class _Inputs:
    """The one attribute ``variance`` reads from its ``inputs`` argument."""

    def __init__(self, input_ids: Tensor):
        self.input_ids = input_ids


class _lora_trainable:
    """Only the LoRA weights require grad (both functions select parameters that way)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.before = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for n, p in self.model.named_parameters():
            p.requires_grad_("lora_" in n)

    def __exit__(self, *exc) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.before[n])
