"""The answer-token classifier (method.md section 1) and the tokenisation it reads.

The next-token logits at the last prompt position, restricted to the C answer tokens,
``f(x; theta)`` of shape (B, C). Only the last position goes through ``lm_head`` (a (B, H)
input, not (B, T, H)), which saves a (B, T, V) logits tensor. Position ids are derived from the
attention mask, so left and right padding give the same logits. A prompt longer than
``finetune.max_length`` loses the characters its dataset marks as expendable (:func:`shorten`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lalora.core.errors import ModelError, UserError


@dataclass(frozen=True)
class Batch:
    """A tokenised batch: ``input_ids`` and ``attention_mask`` (B, T), ``labels`` (B,)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str | None) -> Batch:
        """The batch on ``device`` (itself when it is there already, or ``device`` is None)."""
        if device is None or self.input_ids.device == torch.device(device):
            return self
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def answer_token_ids(
    tokenizer, answers: tuple[str, ...], prompts: list[str] | tuple[str, ...] = ("Answer:",)
) -> list[int]:
    """The token id of each answer as the model reads it after a prompt: the first id of
    tokenize(prompt + answer) after tokenize(prompt), which must be the same for every one of
    ``prompts`` (the split's own, ending in ``Answer:``) and differ between the answers.

    This is not ``encode(answer)``: a SentencePiece tokenizer with a dummy prefix (LLaMA-2,
    Phi-3) encodes " A" alone as a bare "▁" and "▁A", but continues "Answer:" with "▁A" alone.
    A prompt whose own tokens change when the answer is appended (the answer merges with its
    end) is refused, naming it, as is an answer whose id depends on the prompt."""
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ModelError("answer tokens need at least one prompt to continue")
    heads = tokenizer(unique, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for ans in answers:
        full = tokenizer([p + ans for p in unique], add_special_tokens=False)["input_ids"]
        firsts = [ext[len(head)] if ext[: len(head)] == head and len(ext) > len(head) else None
                  for head, ext in zip(heads, full, strict=True)]  # fmt: skip
        for prompt, head, ext, first in zip(unique, heads, full, firsts, strict=True):
            if first is None:
                raise ModelError(
                    f"answer {ans!r} does not follow the prompt {prompt[-60:]!r} as tokens of its "
                    f"own (prompt {head[-4:]}, prompt + answer {ext[-5:]}): end the prompt "
                    "so that the answer starts a new token (e.g. with 'Answer:')"
                )
            if first != firsts[0]:
                raise ModelError(
                    f"answer {ans!r} is token {first} after the prompt "
                    f"{prompt[-60:]!r} and {firsts[0]} after an earlier one: the prompts must end "
                    "alike (e.g. with 'Answer:')"
                )
        ids.append(firsts[0])
    if len(set(ids)) != len(ids):
        raise ModelError(f"answers {list(answers)} start with the same token: {ids}")
    return ids


class PromptTooLongError(UserError, ValueError):
    """A prompt exceeds ``finetune.max_length`` tokens and cannot be shortened enough."""


Cut = tuple[int, int, str]  # (start, end, keep): the characters that may go, and what stays


def shorten(ids: list[int], offsets: list[tuple[int, int]], cut: Cut | None, max_length: int,
            what: str) -> list[int]:  # fmt: skip
    """``ids`` (one prompt's tokens, with their character ``offsets``) cut to ``max_length``
    by dropping tokens inside the span ``cut`` only: its first tokens when ``keep`` is
    ``"end"``, its last when ``"start"``. Everything outside the span (the instruction, the
    choices, ``Answer:``) stays; a prompt whose fixed parts alone exceed ``max_length``, or
    that has no span, is refused naming ``what``."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids
    if cut is None:
        raise PromptTooLongError(
            f"{what} has {len(ids)} tokens, more than finetune.max_length {max_length}, and no "
            "part that may be shortened: raise finetune.max_length"
        )
    start, end, keep = cut
    inside = [j for j, (a, b) in enumerate(offsets) if start <= a and b <= end and a < b]
    if len(inside) < excess:
        raise PromptTooLongError(
            f"{what} has {len(ids)} tokens and its fixed parts (instruction, choices, "
            f"'Answer:') alone take {len(ids) - len(inside)}, more than finetune.max_length "
            f"{max_length}: raise finetune.max_length"
        )
    drop = set(inside[:excess] if keep == "end" else inside[len(inside) - excess :])
    return [t for j, t in enumerate(ids) if j not in drop]


def tokenize(
    tokenizer, prompts: list[str], max_length: int, cuts: list[Cut | None] | None = None,
    names: list[str] | None = None,
) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """Each prompt's token ids, shortened to ``max_length`` by :func:`shorten` (``cuts``: one
    span or None per prompt; ``names``: how an error names a prompt), and the number of tokens
    cut from each."""
    cuts = cuts or [None] * len(prompts)
    enc = tokenizer(prompts, return_offsets_mapping=True, add_special_tokens=True)
    out, removed = [], []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        what = f"prompt {names[i]!r}" if names else f"prompt {prompts[i][:60]!r}..."
        short = shorten(list(ids), [tuple(o) for o in offsets], cuts[i], max_length, what)
        out.append(short)
        removed.append(len(ids) - len(short))
    return out, removed


def encode(
    tokenizer, prompts: list[str], labels: list[int], max_length: int, padding_side: str = "right",
    cuts: list[Cut | None] | None = None, device: torch.device | str | None = None,
) -> Batch:  # fmt: skip
    """Tokenise prompts into a padded batch of at most ``max_length`` positions, on ``device``
    (the one place a batch moves to the compute device): a longer prompt loses tokens of its
    ``cuts`` span only (:func:`shorten`; the question's start, or BoolQ's passage end), never
    its instruction, choices or ``Answer:``."""
    rows, _ = tokenize(tokenizer, prompts, max_length, cuts)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Batch(ids, mask, torch.tensor(labels, dtype=torch.long)).to(device)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of the last non-padding position per row, (B,), for left or right padding."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).int().argmax(-1)


def answer_logits(model: nn.Module, batch: Batch, answer_ids: list[int]) -> Tensor:
    """The classifier f(x; theta): answer-token logits at the last prompt position, (B, C)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch.attention_mask
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = base.get_decoder()(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids
    ).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h_last = hidden[rows, last_positions(mask)]  # (B, H)
    logits = base.get_output_embeddings()(h_last)  # (B, V)
    out = logits[:, answer_ids]  # (B, C)
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
