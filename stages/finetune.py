"""Stage finetune@<model>: LoRA fine-tuning with checkpoints at step 0 and every interval."""

from __future__ import annotations

import argparse
from pathlib import Path

from lalora.cli import run
from lalora.config import load_params
from lalora.data import DataError, read_split
from lalora.devices import resolve
from lalora.distributed import finish, init
from lalora.finetune import train
from lalora.io import atomic_write_text
from lalora.models import answer_token_ids, attach_lora, load_base_model, load_tokenizer
from lalora.pipeline import fingerprint, guard_memory, measure
from lalora.provenance import code_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared train split (jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--loss-csv", type=Path, required=True)
    args = parser.parse_args()

    params = load_params(args.params)
    dist = init()
    card = params.card(args.model)
    split = read_split(args.data)
    if not split.examples:
        raise DataError(f"{args.data}: no training examples; check data.* in params.yaml")
    device = resolve(params.launch.device)
    tok = load_tokenizer(card)
    _, longest = measure(tok, split.examples, params.finetune.max_length, f"finetune {args.data}")
    guard_memory(params, args.model, "finetune", tok, split.examples, len(split.answers),
                 tokens=longest)  # fmt: skip
    base = load_base_model(card, len(tok), seed=params.finetune.seed, device=device)
    model = attach_lora(base, card, seed=params.finetune.seed)
    # the run: model card, schedule, data, and the code and libraries that train it
    run_id = fingerprint(card, params.finetune, args.data, code_fingerprint(Path(__file__)))
    result = train(
        model,
        tok,
        list(split.examples),
        answer_token_ids(tok, split.answers, [e.prompt for e in split.examples]),
        params.finetune,
        args.out,
        run_id,
        dist=dist,
    )
    if dist.main:
        rows = ["step,loss"] + [f"{s},{loss:.6f}" for s, loss in result.losses]
        atomic_write_text(args.loss_csv, "\n".join(rows) + "\n")
    finish(dist)


if __name__ == "__main__":
    run(main)
