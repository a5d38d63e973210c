"""Laplace-LoRA on any PEFT LoRA model, with no pipeline: (prompt, answer) pairs in,
calibrated answer probabilities out (README, "Laplace-LoRA on your own PEFT model").

:func:`laplace_lora` fits the Kronecker factors of every LoRA map on the training pairs, tunes
the prior (the validation NLL when validation pairs are given, else the marginal likelihood)
and returns a :class:`LaplaceLoRA`, whose :meth:`~LaplaceLoRA.predict` gives the MAP and the
linearised Laplace predictive (Yang et al. 2024) for new prompts. The steps and defaults are
the pipeline's own (``fit_kfac``, ``tune_prior`` and ``evaluate`` call the same functions), so
on the same model and data the two give the same probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from lalora.config import KfacConfig, PredictiveConfig, PriorConfig
from lalora.laplace.tuning import TunedPriors


@dataclass(frozen=True)
class Prediction:
    """Per prompt: the MAP probabilities ``map`` (N, C), the Laplace predictive ``probs``
    (N, C), and the standard deviation ``std`` (N, C - 1) of each logit contrast
    f_c - f_C under the posterior."""

    map: Tensor
    probs: Tensor
    std: Tensor


@dataclass(frozen=True)
class LaplaceLoRA:
    """A PEFT LoRA model with its tuned Laplace posteriors (``tuned.posteriors``: ``la``,
    ``la_val`` with validation pairs, ``llla`` with an ``lm_head`` LoRA)."""

    model: nn.Module
    tokenizer: Any
    answer_ids: list[int]
    tuned: TunedPriors
    predictive: PredictiveConfig = field(default_factory=PredictiveConfig)
    batch_size: int = 8
    max_length: int = 512

    def predict(self, prompts: list[str], method: str | None = None) -> Prediction:
        """The prediction for ``prompts`` (each ending where the answer token follows, e.g.
        "... Answer:") under the posterior ``method`` (default: the configured one)."""
        from lalora.data.files import Example

        return self.predict_examples([Example(str(i), p, 0) for i, p in enumerate(prompts)],
                                     method)  # fmt: skip

    def predict_examples(self, examples: list, method: str | None = None) -> Prediction:
        """As :meth:`predict` for prepared :class:`lalora.data.files.Example` s (whose ``cut`` says
        which part of a prompt over ``max_length`` tokens may be shortened)."""
        from lalora.laplace.predictive import predict_covariances, predictive_probs
        from lalora.models.adapters import lora_modules
        from lalora.models.pipeline import batches

        method = method or self.tuned.configured
        if method not in self.tuned.posteriors:
            raise KeyError(f"no posterior {method!r}; tuned: {sorted(self.tuned.posteriors)}")
        device = next(self.model.parameters()).device
        data = list(batches(self.tokenizer, examples, self.batch_size, self.max_length, device))
        post = {method: self.tuned.posteriors[method]}
        mods = lora_modules(self.model)
        mean, covs = predict_covariances(self.model, data, _logits_fn(self.answer_ids), mods, post)
        pred = self.predictive
        probs = predictive_probs(mean, covs[method], pred.link, pred.samples, pred.seed)
        std = torch.diagonal(covs[method], dim1=1, dim2=2).clamp(min=0).sqrt()
        return Prediction(torch.softmax(mean, -1), probs, std)

    def probs(self, prompts: list[str], method: str | None = None) -> Tensor:
        """The Laplace predictive probabilities (N, C) of ``prompts``."""
        return self.predict(prompts, method).probs


def _batches(tokenizer, pairs, batch_size: int, max_length: int, model: nn.Module) -> list:
    from lalora.data.files import Example
    from lalora.models.pipeline import batches

    examples = [Example(str(i), prompt, int(label)) for i, (prompt, label) in enumerate(pairs)]
    device = next(model.parameters()).device
    return list(batches(tokenizer, examples, batch_size, max_length, device))


def _logits_fn(answer_ids: list[int]):
    from lalora.models.pipeline import logits_fn

    return logits_fn(answer_ids)


def laplace_lora(
    model: nn.Module,
    tokenizer,
    train: list[tuple[str, int]],
    answers: list[str] | tuple[str, ...],
    val: list[tuple[str, int]] | None = None,
    init: dict[str, Tensor] | None = None,
    kfac: KfacConfig | None = None,
    prior: PriorConfig | None = None,
    predictive: PredictiveConfig | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> LaplaceLoRA:
    """Fit a Laplace posterior over the LoRA weights of the PEFT ``model`` on the ``train``
    pairs (prompt, index of the true answer in ``answers``, the answer strings whose next
    tokens are the classes, e.g. ``[" A", " B"]``).

    Args:
        val: validation pairs; the prior minimises their NLL (else the marginal likelihood).
        init: the LoRA weights at initialisation by module (``lalora.models.adapters.lora_modules``
            names), for a prior centred there; None: centred at zero.
        kfac, prior, predictive: the pipeline's sections (defaults: its defaults, the prior's
            ``method`` following ``val`` and its ``mean`` following ``init``).
        batch_size, max_length: as ``kfac.batch_size`` / ``evaluate.batch_size`` and
            ``finetune.max_length``.

    Returns:
        A :class:`LaplaceLoRA` (call ``.predict(prompts)`` or ``.probs(prompts)``).
    """
    from lalora.laplace.kfac import fit_kfac
    from lalora.laplace.predictive import jacobian_features
    from lalora.laplace.tuning import Validation, centre, tune_priors
    from lalora.models.adapters import lora_modules
    from lalora.models.classifier import answer_token_ids

    kfac = kfac or KfacConfig(batch_size=batch_size)
    prior = prior or replace(PriorConfig(), method="val_nll" if val else "marglik",
                             mean="init" if init is not None else "zero")  # fmt: skip
    predictive = predictive or PredictiveConfig()
    model.eval()
    modules = lora_modules(model)
    ids = answer_token_ids(tokenizer, tuple(answers), [p for p, _ in [*train, *(val or [])]])
    fn = _logits_fn(ids)
    post = fit_kfac(
        model, _batches(tokenizer, train, kfac.batch_size, max_length, model), fn, modules,
        fisher=kfac.fisher, rank=kfac.rank, max_dense=kfac.max_dense, update=kfac.update,
        seed=kfac.seed, normalisation=kfac.normalisation,
    )  # fmt: skip
    weights = {n: m.weight.detach().cpu() for n, m in modules.items()}
    post, _ = centre(post, weights, init)
    validation = None
    if val:
        vb = _batches(tokenizer, val, batch_size, max_length, model)
        labels = torch.tensor([int(label) for _, label in val])
        validation = Validation(jacobian_features(model, vb, fn, modules, post), labels)
    tuned = tune_priors(post, validation, prior, predictive, where="laplace_lora")
    return LaplaceLoRA(model, tokenizer, ids, tuned, predictive, batch_size, max_length)
