"""The deep ensemble's extra members (Lakshminarayanan et al. 2017, "Simple and scalable
predictive uncertainty estimation using deep ensembles"): the study's fine-tuning repeated with
another seed (LoRA initialisation, batch order, dropout), then its MAP predictions on the test
split. The ensemble itself, the average of the members' and the study's own final MAP
predictions, is formed from saved predictions (:func:`lalora.study.comparison.compare`, with
:func:`lalora.models.baselines.checkpoint_ensemble`'s average).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lalora.config import Params
from lalora.data.files import DataError, read_split
from lalora.runtime.distributed import SINGLE, Dist, map_batches

if TYPE_CHECKING:  # the model's modules are imported by a member's run: none without members
    from torch import Tensor


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
    the stage's :func:`~lalora.core.provenance.code_fingerprint`, matches), and return its final MAP
    probabilities (N, C), the labels (N,) and the example ids of ``test_path``; data parallel
    over ``dist``'s processes, each of which returns the whole result. ``out`` lies in the
    stage's tracked folder of members (``.../members/seed-<s>``): a stale or rejected run is
    moved outside it, into ``.../members.stale/``, so DVC's cache never keeps it."""
    import torch

    from lalora.models.classifier import answer_token_ids
    from lalora.models.pipeline import batches, map_probs
    from lalora.training.recipe import finetune

    d = dist or SINGLE
    test = read_split(test_path)
    if not test.examples:
        raise DataError(f"{test_path}: no examples; check data.* in params.yaml")
    aside = out.parent.with_name(f"{out.parent.name}.stale")
    run = finetune(params, model_name, train_path, out, code, seed, "members", d, aside)
    model, tok = run.model, run.tokenizer
    model.eval()
    examples = list(test.examples)
    device = next(model.parameters()).device
    size, max_length = params.evaluate.batch_size, params.finetune.max_length
    test_batches = list(batches(tok, examples, size, max_length, device))
    ids = answer_token_ids(tok, test.answers, [e.prompt for e in examples])
    probs = map_batches(lambda _, b: map_probs(model, [b], ids), test_batches, d)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return probs, labels, [e.id for e in examples]


def train_members(
    params: Params, model_name: str, train_path: Path, test_path: Path, out: Path,
    predictions: Path, code: str, dist: Dist | None = None,
) -> list[int]:  # fmt: skip
    """Every extra member of ``ensemble`` (:func:`train_member`, seeds ``finetune.seed + 1,
    ...``): its run in ``out/seed-<s>/``, its final MAP predictions in
    ``predictions/seed-<s>.safetensors``, and the list of seeds in ``members.json`` of both
    folders (empty with ``ensemble.members: 1``). Returns the seeds."""
    from lalora.core.io import atomic_write_json, save_predictions

    d = dist or SINGLE
    seeds = params.ensemble.seeds(params.finetune)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        run = out / f"seed-{seed}"
        probs, labels, ids = train_member(params, model_name, train_path, test_path, run, seed,
                                          code, d)  # fmt: skip
        if d.main:
            meta = {"seed": seed, "step": params.finetune.steps}
            save_predictions(predictions / f"seed-{seed}.safetensors", {"map": probs}, labels,
                             ids, meta)  # fmt: skip
            print(f"{model_name} member seed {seed}: trained {params.finetune.steps} steps")
    if d.main:
        atomic_write_json(out / "members.json", {"seeds": seeds})
        atomic_write_json(predictions / "members.json", {"seeds": seeds})
    return seeds
