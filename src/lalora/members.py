"""The deep ensemble's extra members (Lakshminarayanan et al. 2017, "Simple and scalable
predictive uncertainty estimation using deep ensembles"): the study's fine-tuning repeated with
another seed (LoRA initialisation, batch order, dropout), then its MAP predictions on the test
split. The ensemble itself, the average of the members' and the study's own final MAP
predictions, is formed from saved predictions (:func:`lalora.comparison.compare`, with
:func:`lalora.baselines.checkpoint_ensemble`'s average).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import Tensor

from lalora.config import Params
from lalora.data import DataError, read_split
from lalora.devices import resolve
from lalora.distributed import SINGLE, Dist, map_batches
from lalora.finetune import train
from lalora.models import answer_token_ids, attach_lora, load_base_model, load_tokenizer
from lalora.pipeline import batches, fingerprint, guard_memory, map_probs


def train_member(
    params: Params,
    model_name: str,
    train_path: Path,
    test_path: Path,
    out: Path,
    seed: int,
    code: str,
    dist: Dist | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Fine-tune ``model_name`` on ``train_path`` as ``finetune`` says but with ``seed``
    (checkpoints in ``out``, resumed like the study's own run whose fingerprint, with ``code``
    the stage's :func:`~lalora.provenance.code_fingerprint`, matches), and return its final MAP
    probabilities (N, C), the labels (N,) and the example ids of ``test_path``; data parallel
    over ``dist``'s processes, each of which returns the whole result. ``out`` lies in the
    stage's tracked folder of members (``.../members/seed-<s>``): a stale or rejected run is
    moved outside it, into ``.../members.stale/``, so DVC's cache never keeps it."""
    import torch

    d = dist or SINGLE
    cfg = replace(params.finetune, seed=seed)
    card = params.card(model_name)
    split, test = read_split(train_path), read_split(test_path)
    for path, s in ((train_path, split), (test_path, test)):
        if not s.examples:
            raise DataError(f"{path}: no examples; check data.* in params.yaml")
    device = resolve(params.launch.device)
    tok = load_tokenizer(card)
    guard_memory(params, model_name, "members", tok, split.examples, len(split.answers))
    base = load_base_model(card, len(tok), seed=seed, device=device)
    model = attach_lora(base, card, seed=seed)
    train(
        model,
        tok,
        list(split.examples),
        answer_token_ids(tok, split.answers, [e.prompt for e in split.examples]),
        cfg,
        out,
        fingerprint(card, cfg, train_path, code),
        progress=d.main,
        dist=d,
        aside=out.parent.with_name(f"{out.parent.name}.stale"),
    )
    model.eval()
    examples = list(test.examples)
    test_batches = list(batches(tok, examples, params.evaluate.batch_size, cfg.max_length, device))
    ids = answer_token_ids(tok, test.answers, [e.prompt for e in examples])
    probs = map_batches(lambda _, b: map_probs(model, [b], ids), test_batches, d)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return probs, labels, [e.id for e in examples]
