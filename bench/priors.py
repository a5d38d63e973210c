"""The prior of the Kronecker Laplace posterior, compared on the pipeline's checkpoints.

    python -m bench.priors --model smollm2-135m                 # after `dvc repro`
    python -m bench.priors --steps 0 400 --out /tmp/priors.md

For each checkpoint, one Jacobian pass over the test split and one over the validation split give
the linearised predictive at any prior; the saved Kronecker factors
(``models/<model>/<dataset>/kfac/step-<N>``) give log Z. Compared: the marginal-likelihood prior,
scalar or one precision per LoRA module (``layerwise``), centred at zero or at the LoRA
initialisation (the step-0 adapter); and the scalar prior minimising the validation NLL. Each row
gives lambda (the geometric mean for layerwise), log Z (comparable between marglik rows of one
checkpoint: the evidence for that prior), and ACC / NLL / ECE / mean confidence on the test split.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from lalora.config import load_params
from lalora.data import read_split
from lalora.io import atomic_write_text
from lalora.laplace.marglik import (
    PriorAtEdgeWarning,
    edges_of,
    log_marginal_likelihood,
    squared_distances,
    tune_prior,
)
from lalora.laplace.posterior import Posterior
from lalora.laplace.predictive import (
    jacobian_features,
    logit_covariance,
    predictive_probs,
    tune_prior_nll,
)
from lalora.metrics import score
from lalora.models import adapter_lora_weights, answer_token_ids, lora_modules
from lalora.pipeline import batches, load_adapted, logits_fn


def geometric_mean(values: dict[str, float]) -> float:
    return math.exp(sum(math.log(v) for v in values.values()) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=None, help="default: the first of params' datasets")
    parser.add_argument("--steps", type=int, nargs="*", help="default: params' checkpoints")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--n-test", type=int, default=0, help="first N test prompts (0: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/priors.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", PriorAtEdgeWarning)  # edges are marked in the table

    t0 = time.time()
    params = load_params(args.params)
    dataset = args.dataset or params.datasets[0]
    params.dataset(dataset)  # a clear error for an unknown name
    card, pr, pred = params.card(args.model), params.prior, params.predictive
    root = args.models_dir / args.model / dataset
    test_split = read_split(args.data_dir / dataset / "test.jsonl")
    test_examples = list(test_split.examples)[: args.n_test or None]
    val_split = read_split(args.data_dir / dataset / "val.jsonl")
    steps = args.steps if args.steps else list(params.checkpoints)
    lines = [
        f"# Priors of the Kronecker Laplace posterior: {args.model}, data `{dataset}`",
        "",
        f"`python -m bench.priors --model {args.model} --n-test {args.n_test}` on the "
        "artifacts of `dvc repro`: factors "
        f"from {{n_train}} training prompts, validation NLL on {len(val_split.examples)} "
        f"prompts, metrics on {len(test_examples)} test prompts, "
        f"{pred.link} link. An edge of the search range [1e{pr.log10_min:g}, "
        f"1e{pr.log10_max:g}] is marked (high: the MAP predictive).",
        "",
        "| step | prior | lambda | log Z | ACC | NLL | ECE | mean conf |",
        "|---|---|---|---|---|---|---|---|",
    ]
    n_train = None
    for step in steps:
        post = Posterior.load(root / "kfac" / f"step-{step}")
        n_train = post.n_data
        tok, model = load_adapted(card, root / "adapters" / f"step-{step}")
        names = list(post.modules)
        sq_init = squared_distances(
            adapter_lora_weights(root / "adapters" / f"step-{step}", names),
            adapter_lora_weights(root / "adapters" / "step-0", names),
        )
        fn = logits_fn(answer_token_ids(tok, test_split.answers))
        feats = {}
        labels = {}
        for name, ex in (("test", test_examples), ("val", list(val_split.examples))):
            bs = list(batches(tok, ex, params.evaluate.batch_size, params.finetune.max_length))
            feats[name] = jacobian_features(model, bs, fn, lora_modules(model), post)
            labels[name] = torch.tensor([e.label for e in ex])

        def row(
            label: str, tuned: Posterior | None, step=step, f=feats["test"], y=labels["test"]
        ) -> None:
            if tuned is None:
                p = torch.softmax(f.mean, -1)
                lam, log_z, edge = "-", "-", ""
            else:
                cov = logit_covariance(f, tuned)
                p = predictive_probs(f.mean, cov, pred.link, pred.samples, pred.seed)
                e = sorted(
                    set(edges_of(tuned.prior_precision, pr.log10_min, pr.log10_max).values())
                )
                edge = f" ({', '.join(e)} edge)" if e else ""
                lam = f"{geometric_mean(tuned.prior_precision):.3g}"
                log_z = f"{log_marginal_likelihood(tuned):.1f}"
            s = score(p, y)
            conf = float(p.max(-1).values.mean())
            lines.append(
                f"| {step} | {label}{edge} | {lam} | {log_z} | {s.acc:.3f} | {s.nll:.3f} | "
                f"{s.ece:.3f} | {conf:.3f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)

        row("MAP", None)
        for mean in ("zero", "init"):
            base = post if mean == "zero" else post.with_theta_sq(sq_init)
            for structure in ("scalar", "layerwise"):
                tuned = tune_prior(
                    base, structure, pr.log10_min, pr.log10_max, pr.grid, accept_edge=True
                )
                row(f"marglik, {structure}, mean {mean}", tuned)
        tuned, _ = tune_prior_nll(
            feats["val"],
            labels["val"],
            post,
            pred.link,
            pred.samples,
            pred.seed,
            pr.log10_min,
            pr.log10_max,
            pr.grid,
        )
        row("validation NLL, scalar", tuned)
    lines[2] = lines[2].replace("{n_train}", str(n_train)) + f" {time.time() - t0:.0f} s."
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
