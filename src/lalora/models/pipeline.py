"""Helpers the pipeline stages share: batching, tokenisation records, loading an adapted
model and a prepared split, the memory check before a model loads, run fingerprints. Where
each artifact lives is :class:`lalora.core.paths.Layout`'s (the paths ``dvc.yaml`` gives the stages,
tested equal).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lalora.config import ModelCard, Params
from lalora.data.files import DataError, Example, read_split
from lalora.models.adapters import load_adapter, lora_modules
from lalora.models.classifier import (
    Batch,
    PromptTooLongError,
    answer_logits,
    answer_token_ids,
    encode,
    tokenize,
)
from lalora.models.zoo import load_card_model


def batches(
    tokenizer, examples: list[Example] | tuple[Example, ...], batch_size: int, max_length: int,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:  # fmt: skip
    """Consecutive tokenised batches of ``examples`` on ``device`` (right padding; a prompt
    over ``max_length`` tokens loses part of its question or passage only, see
    :func:`encode`)."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts, labels = [e.prompt for e in chunk], [e.label for e in chunk]
        yield encode(
            tokenizer, prompts, labels, max_length, cuts=[e.cut for e in chunk], device=device
        )


def truncation(tokenizer, examples: Sequence[Example], max_length: int, what: str) -> dict:
    """How many of ``examples`` exceed ``max_length`` tokens and are shortened, printed when
    any is: ``{"prompts": n, "of": N, "max_tokens": most tokens cut from one}``. A prompt that
    cannot be shortened enough stops here, naming it (:func:`lalora.models.classifier.shorten`)."""
    return measure(tokenizer, examples, max_length, what)[0]


def measure(tokenizer, examples: Sequence[Example], max_length: int, what: str) -> tuple[dict, int]:
    """:func:`truncation`'s record, and the most tokens a prompt has once shortened (what the
    memory estimate reads), from one tokenisation."""
    try:
        rows, removed = tokenize(
            tokenizer, [e.prompt for e in examples], max_length, [e.cut for e in examples],
            [e.id for e in examples],
        )  # fmt: skip
    except PromptTooLongError as err:
        raise PromptTooLongError(f"{what}: {err}") from None
    cut = [r for r in removed if r]
    out = {"prompts": len(cut), "of": len(examples), "max_tokens": max(cut, default=0)}
    if cut:
        print(
            f"{what}: {len(cut)} of {len(examples)} prompts exceed finetune.max_length "
            f"{max_length} tokens and are shortened by up to {out['max_tokens']} tokens (their "
            "question's start, or the end of a BoolQ passage; instruction, choices and "
            "'Answer:' are kept)",
            file=sys.stderr,
        )
    return out, max((len(r) for r in rows), default=1)


def logits_fn(answer_ids: list[int]):
    """The classifier for the Laplace library: ``(model, batch) -> (B, C)``."""
    return lambda model, batch: answer_logits(model, batch, answer_ids)


def load_adapted(
    card: ModelCard, adapter_dir: Path, seed: int = 0, device: torch.device | str = "cpu"
):
    """Tokenizer and the base model with an exported adapter loaded, on ``device``, in eval
    mode."""
    tok, base = load_card_model(card, seed=seed, device=device)
    model = load_adapter(base, adapter_dir)
    model.eval()
    return tok, model


@dataclass(frozen=True)
class SplitRun:
    """An adapted model and one prepared split, in the form the Laplace library takes:
    tokenised ``batches``, ``logits_fn(model, batch) -> (B, C)``, the LoRA ``modules``, the
    true ``labels`` (N,) and how many prompts were shortened (:func:`truncation`)."""

    model: nn.Module
    batches: list[Batch]
    logits_fn: Callable[[nn.Module, Batch], Tensor]
    modules: dict[str, nn.Linear]
    labels: Tensor
    truncated: dict


def longest_prompt(tokenizer, examples: Sequence[Example], max_length: int) -> int:
    """The most tokens a prompt of ``examples`` has once shortened to ``max_length``."""
    prompts, cuts = [e.prompt for e in examples], [e.cut for e in examples]
    return max((len(r) for r in tokenize(tokenizer, prompts, max_length, cuts)[0]), default=1)


def guard_memory(
    params: Params, model_name: str, stage: str, tokenizer, examples: Sequence[Example],
    n_choices: int, n_val: int = 0, tokens: int | None = None,
) -> None:  # fmt: skip
    """Estimate ``stage``'s peak memory from the card's architecture (no weights loaded) and
    the params, at the longest prompt of ``examples`` (``tokens``, when the caller has it from
    :func:`measure`); print it, and refuse a setting that cannot fit
    (:func:`lalora.models.memory.guard`)."""
    from lalora.models.memory import Sizes, architecture, guard, stage_memory
    from lalora.models.zoo import model_config
    from lalora.runtime.devices import resolve

    card = params.card(model_name)
    arch = architecture(model_config(card, len(tokenizer)), card)
    if tokens is None:
        tokens = longest_prompt(tokenizer, examples, params.finetune.max_length)
    memory = stage_memory(stage, arch, card, Sizes.of(params), n_choices, n_val, tokens)
    launch = params.launch
    guard(memory, resolve(launch.device), launch.memory_gb, launch.nproc_per_node)


def load_split_run(
    params: Params, model_name: str, adapter_dir: Path, split_path: Path, batch_size: int,
    loaded: tuple | None = None, stage: str | None = None,
) -> SplitRun:  # fmt: skip
    """Read a prepared split, load the model's adapter on ``launch.device`` (or take
    ``loaded``, the (tokenizer, model) of an earlier :func:`load_adapted`, so a stage loads
    the model once) and tokenise the split into batches of ``batch_size`` (truncated to
    ``finetune.max_length``) on the model's device. With ``stage``, the stage's memory is
    estimated and checked first (:func:`guard_memory`), before the model loads."""
    from lalora.models.zoo import load_base_model, load_tokenizer
    from lalora.runtime.devices import module_device, resolve

    split = read_split(split_path)
    if not split.examples:
        raise DataError(f"{split_path}: the split has no examples; check data.* in params.yaml")
    card = params.card(model_name)
    examples = list(split.examples)
    tok = loaded[0] if loaded is not None else load_tokenizer(card)
    cut, longest = measure(tok, examples, params.finetune.max_length, str(split_path))
    if stage is not None:
        n_val = len(examples) if stage == "tune_prior" else 0
        guard_memory(params, model_name, stage, tok, examples, len(split.answers), n_val, longest)
    if loaded is None:
        base = load_base_model(card, len(tok), device=resolve(params.launch.device))
        model = load_adapter(base, adapter_dir)
        model.eval()
    else:
        model = loaded[1]
    device, max_length = module_device(model), params.finetune.max_length
    return SplitRun(
        model=model,
        batches=list(batches(tok, examples, batch_size, max_length, device)),
        logits_fn=logits_fn(answer_token_ids(tok, split.answers, [e.prompt for e in examples])),
        modules=lora_modules(model),
        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
        truncated=cut,
    )


def fingerprint(*parts: object) -> str:
    """A stable hash of configs (dataclasses or json-able values) and file contents."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        elif hasattr(part, "__dataclass_fields__"):
            h.update(json.dumps(asdict(part), sort_keys=True, default=str).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def map_probs(model: nn.Module, batches: list[Batch], answer_ids: list[int]) -> Tensor:
    """MAP predictive probabilities (N, C): softmax of the answer logits, no gradients."""
    return torch.cat(
        [torch.softmax(answer_logits(model, b, answer_ids).double(), -1).cpu() for b in batches]
    )
