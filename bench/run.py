"""Benchmark: Laplace-LoRA cost against the floor and against bayesian-lora 0.0.6, error against
the exact factors and predictive covariance, and scaling. Prints a markdown report.

    python -m bench.run                 # SmolLM2-135M, 120 WinoGrande-S train / 60 dev prompts
    python -m bench.run --model tiny --n-train 16 --n-test 8 --repeats 1 --scaling none

Times are medians over ``--repeats``; ours and the reference alternate within each repeat, so
every ratio compares measurements taken side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import errors, reference, workloads
from bench.measure import Sample, Summary, measure, summarise
from lalora.core.io import atomic_write_text
from lalora.laplace.kfac import fit_kfac
from lalora.laplace.marglik import tune_prior
from lalora.laplace.predictive import jacobian_features, logit_covariance
from lalora.models.adapters import lora_modules
from lalora.models.pipeline import logits_fn


@dataclass
class Timings:
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, key: str, sample: Sample) -> None:
        self.samples.setdefault(key, []).append(sample)

    def get(self, key: str) -> Summary:
        return summarise(self.samples[key])

    def ratio(self, key: str, base: str) -> float:
        """Median over repeats of the paired ratio key / base (each repeat's two measurements
        taken one after the other), robust to a machine whose speed drifts between repeats."""
        pairs = zip(self.samples[key], self.samples[base], strict=True)
        return statistics.median(a.seconds / b.seconds for a, b in pairs)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _time_phases(args, s: workloads.Setup, with_reference: bool) -> Timings:
    """Every phase of sections 1 and 2, ``args.repeats`` times, each repeat's measurements
    taken one after the other."""
    t = Timings()
    post = None
    for rep in range(args.repeats):
        print(f"cost: repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        t.add("epoch", measure(workloads.epoch, s)[0])
        smp, p = measure(
            workloads.ours_fit, s, s.train, args.rank, args.threshold, args.update, args.max_dense
        )
        t.add("fit dense", smp)
        for update in ("svd", "nystrom"):
            smp, _ = measure(workloads.ours_fit, s, s.train, args.rank, args.threshold, update)
            t.add(f"fit {update}", smp)
        post = tune_prior(p)
        t.add("map", measure(workloads.ours_map, s)[0])
        t.add("predictive", measure(workloads.ours_predictive, s, post)[0])
        t.add("fwd+bwd", measure(workloads.forward_backward, s)[0])
        if with_reference:
            ref = (s.model, s.train, s.answer_ids, args.rank, args.threshold)
            smp, factors = measure(reference.fit_factors, *ref)
            t.add("ref fit", smp)
            lam = workloads.scalar_prior(post)
            smp, _ = measure(
                reference.predictive_variance,
                s.model,
                s.test,
                s.answer_ids,
                factors,
                lam,
                s.card.r,
                args.rank,
                args.threshold,
            )
            t.add("ref predictive", smp)

    return t


def _fit_rows(args, t: Timings) -> list[str]:
    """Section 1's factor-fit rows: each low-rank update against an epoch."""
    lines = []
    for key, label in (
        ("fit dense", f"dense sides up to {args.max_dense} (the default), {args.update} beyond"),
        ("fit svd", f"sides >= {args.threshold} low-rank, svd"),
        ("fit nystrom", f"sides >= {args.threshold} low-rank, nystrom"),
    ):
        f = t.get(key)
        r = t.ratio(key, "epoch")
        lines.append(
            _row(
                f"factor fit, exact Fisher, {label}",
                f"{f.seconds:.2f}",
                f"{f.peak_mib:.0f}",
                f"{r:.2f}",
                "1",
                "met" if r <= 1.2 else "missed",
            )
        )
    return lines


def _floor_table(args, t: Timings) -> list[str]:
    """Section 1: each phase against its floor (an epoch for the fit, the MAP pass for the
    predictive)."""
    ep, mp = t.get("epoch"), t.get("map")
    lines = [
        "### 1. Against the floor",
        "",
        "Floors for C = 2 choices: factor fit / epoch = 1 (one forward, C - 1 = 1 backward, "
        "as training); predictive / MAP = 2 (one forward and one backward against one "
        "forward). Goal: within 1.2x of each. Ratio: the median over repeats of each repeat's "
        "paired ratio (its two measurements taken one after the other).",
        "",
        _row("phase", "median s", "peak MiB", "ratio", "floor", "goal"),
        _row("---", "---:", "---:", "---:", "---:", "---"),
        _row(
            "fine-tuning epoch (fwd + bwd)", f"{ep.seconds:.2f}", f"{ep.peak_mib:.0f}", "1", "", ""
        ),
    ]
    lines += _fit_rows(args, t)
    pr, fb = t.get("predictive"), t.get("fwd+bwd")
    r_pr, r_fb = t.ratio("predictive", "map"), t.ratio("fwd+bwd", "map")
    r_pf = t.ratio("predictive", "fwd+bwd")
    lines += [
        _row("MAP evaluation (fwd)", f"{mp.seconds:.2f}", f"{mp.peak_mib:.0f}", "1", "", ""),
        _row(
            "forward + backward to the LoRA outputs, no Jacobians (the floor's pass)",
            f"{fb.seconds:.2f}",
            f"{fb.peak_mib:.0f}",
            f"{r_fb:.2f}",
            "2",
            "",
        ),
        _row(
            "Laplace predictive (dense-side factors)",
            f"{pr.seconds:.2f}",
            f"{pr.peak_mib:.0f}",
            f"{r_pr:.2f}",
            "2",
            "met" if r_pr <= 2.4 else "missed",
        ),
        _row(
            "Laplace predictive against the floor's pass measured here",
            "",
            "",
            f"{r_pf:.2f}",
            "1",
            "met" if r_pf <= 1.2 else "missed",
        ),
        "",
    ]
    return lines


def _reference_table(args, t: Timings) -> list[str]:
    """Section 2: ours against bayesian-lora's fit and predictive, time and memory."""
    ep, mp, pr = t.get("epoch"), t.get("map"), t.get("predictive")
    rf, rp = t.get("ref fit"), t.get("ref predictive")
    ours_fit = t.get(f"fit {args.update}")
    return [
        f"### 2. Against bayesian-lora 0.0.6 (same model, same batches, rank {args.rank})",
        "",
        _row(
            "phase",
            "ours s",
            "theirs s",
            "ours/theirs time",
            "ours MiB",
            "theirs MiB",
            "ours/theirs memory",
            "goal",
        ),
        _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---"),
        _row(
            f"factor fit (ours: exact Fisher, all positions, {args.update})",
            f"{ours_fit.seconds:.2f}",
            f"{rf.seconds:.2f}",
            f"{ours_fit.seconds / rf.seconds:.2f}",
            f"{ours_fit.peak_mib:.0f}",
            f"{rf.peak_mib:.0f}",
            f"{ours_fit.peak_bytes / max(rf.peak_bytes, 1):.2f}",
            "time <= 1: " + ("met" if ours_fit.seconds <= rf.seconds else "missed"),
        ),
        _row(
            "predictive",
            f"{pr.seconds:.2f}",
            f"{rp.seconds:.2f}",
            f"{pr.seconds / rp.seconds:.3f}",
            f"{pr.peak_mib:.0f}",
            f"{rp.peak_mib:.0f}",
            f"{pr.peak_bytes / max(rp.peak_bytes, 1):.3f}",
            "time <= 0.2 and memory < 0.33: "
            + (
                "met"
                if pr.seconds <= 0.2 * rp.seconds and pr.peak_bytes < rp.peak_bytes / 3
                else "missed"
            ),
        ),
        "",
        f"Their predictive takes {rp.seconds / mp.seconds:.1f}x the MAP evaluation; "
        f"their factor fit {rf.seconds / ep.seconds:.2f}x an epoch.",
        "",
    ]


def cost(args, s: workloads.Setup, with_reference: bool) -> tuple[Timings, list[str]]:
    """Sections 1 and 2: ours against the floor, and against the reference."""
    t = _time_phases(args, s, with_reference)
    lines = _floor_table(args, t)
    if with_reference:
        lines += _reference_table(args, t)
    return t, lines


def accuracy(args, train, test, with_reference: bool) -> list[str]:
    """Section 3: error against the exact factors and the exact predictive covariance."""
    card = workloads.card_for(args.model, lm_head=False, dropout=0.0)
    s = workloads.setup(
        card, train[: args.n_error_train], test[: args.n_error_test], args.batch_size
    )
    modules = lora_modules(s.model)
    fn = logits_fn(s.answer_ids)
    big = 10**9  # every side dense
    exact = fit_kfac(s.model, s.train, fn, modules, "exact", big, big)
    exact = tune_prior(exact)
    lam = workloads.scalar_prior(exact)
    feats = jacobian_features(s.model, s.test, fn, modules, exact)
    var_exact = logit_covariance(feats, exact)[:, 0, 0]
    exact_blocks = errors.ours_blocks(exact)

    lines = [
        f"### 3. Error against the exact factors and predictive (no `lm_head` LoRA, dropout 0, "
        f"{len(s.train_examples)} train / {len(s.test_examples)} test prompts, rank "
        f"{args.rank}, prior precision {lam:.3g} tuned on the exact posterior)",
        "",
        "Exact: dense Kronecker factors of the exact type-2 Fisher over all positions. Factor "
        "error: relative Frobenius error of the blocks A (x) G after the best global scale c; "
        "predictive error: median relative error of the logit-contrast variance.",
        "",
        _row("method", "factor error", "scale c", "predictive variance error"),
        _row("---", "---:", "---:", "---:"),
    ]
    for update in ("svd", "nystrom"):
        post = workloads.ours_fit(s, s.train, args.rank, args.threshold, update)
        err, c = errors.block_error(errors.ours_blocks(post), exact_blocks)
        post = post.with_prior(lam)
        f = jacobian_features(s.model, s.test, fn, modules, post)
        var = logit_covariance(f, post)[:, 0, 0]
        lines.append(
            _row(
                f"ours, {update}",
                f"{err:.3g}",
                f"{c:.3g}",
                f"{errors.variance_error(var, var_exact):.3g}",
            )
        )
    if with_reference:
        lines.append(_reference_accuracy(args, s, card, lam, exact_blocks, var_exact))
    return [*lines, ""]


def _reference_accuracy(args, s: workloads.Setup, card, lam: float, exact_blocks, var_exact):
    """bayesian-lora's row of section 3: its factors scaled by the best c, and its predictive
    variance at the same prior precision."""
    torch.manual_seed(0)
    factors = reference.fit_factors(s.model, s.train, s.answer_ids, args.rank, args.threshold)
    err, c = errors.block_error(errors.reference_blocks(factors, args.rank), exact_blocks)
    scaled = {
        n: (
            a * c if a.shape[0] == a.shape[1] else a,
            sq if a.shape[0] == a.shape[1] else sq * c,
        )
        for n, (a, sq) in factors.items()
    }
    _, cov = reference.predictive_variance(
        s.model, s.test, s.answer_ids, scaled, lam, card.r, args.rank, args.threshold
    )
    var = errors.contrast_variance(cov)
    return _row(
        "bayesian-lora 0.0.6 (factors scaled by c)",
        f"{err:.3g}",
        f"{c:.3g}",
        f"{errors.variance_error(var, var_exact):.3g}",
    )


def scaling(args, s: workloads.Setup) -> list[str]:
    """Section 4: factor-fit time and peak memory against N, T and the rank k."""
    vocab = s.model.get_input_embeddings().weight.shape[0]
    base = {"n": args.scale_n, "length": args.scale_length, "rank": args.rank}
    grid = {
        "n": [base["n"] // 2, base["n"], base["n"] * 2],
        "length": [base["length"] // 2, base["length"], base["length"] * 2],
        "rank": [5, 10, 20, 40],
    }
    lines = [
        f"### 4. Scaling of the factor fit (synthetic prompts, N = {base['n']}, T = "
        f"{base['length']}, k = {base['rank']} unless varied; median of {args.repeats})",
        "",
        _row("varied", "value", "svd s", "svd MiB", "nystrom s", "nystrom MiB"),
        _row("---", "---:", "---:", "---:", "---:", "---:"),
    ]
    for key, values in grid.items():
        for v in values:
            cfg = {**base, key: v}
            batches = workloads.synthetic_batches(vocab, cfg["n"], cfg["length"], args.batch_size)
            cells = []
            for update in ("svd", "nystrom"):
                smp = [
                    measure(workloads.ours_fit, s, batches, cfg["rank"], args.threshold, update)[0]
                    for _ in range(args.repeats)
                ]
                m = summarise(smp)
                cells += [f"{m.seconds:.2f}", f"{m.peak_mib:.0f}"]
            print(f"scaling {key}={v}: {cells}", file=sys.stderr, flush=True)
            lines.append(_row(key, v, *cells))
    return [*lines, ""]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a zoo model, or 'tiny'")
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--n-error-train", type=int, default=24)
    p.add_argument("--n-error-test", type=int, default=16)
    # bayesian-lora's jacrev predictive needs ~24 GB at batch 8 on SmolLM2 (killed here); 4 fits
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=10)
    # bayesian-lora's ``variance`` needs exactly one low-rank side per module, so every side of
    # at least this size (SmolLM2: 192, 576, 49152) is low-rank for both methods.
    p.add_argument("--threshold", type=int, default=128)
    p.add_argument("--update", default="nystrom", choices=("svd", "nystrom"))
    p.add_argument("--max-dense", type=int, default=4096, help="ours: dense sides up to this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale-n", type=int, default=16)
    p.add_argument("--scale-length", type=int, default=64)
    p.add_argument("--sections", default="cost,accuracy,scaling")
    p.add_argument("--no-reference", action="store_true", help="skip bayesian-lora")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    with_reference = not args.no_reference and reference.available()

    torch.manual_seed(0)
    train, test, source = workloads.examples(args.n_train, args.n_test)
    card = workloads.card_for(args.model)
    s = workloads.setup(card, train, test, args.batch_size)
    lines = [
        f"## Benchmark: {args.model}, {len(train)} train / {len(test)} test prompts "
        f"({source}), batch {args.batch_size}, rank {args.rank}, sides >= {args.threshold} "
        f"low-rank, {torch.get_num_threads()} threads",
        "",
    ]
    if not with_reference:
        lines += [
            "bayesian-lora is not installed here: its columns are left out "
            "(`make bench` installs it in `.venv-bench`).",
            "",
        ]
    if "cost" in sections:
        lines += cost(args, s, with_reference)[1]
    if "accuracy" in sections:
        lines += accuracy(args, train, test, with_reference)
    if "scaling" in sections:
        lines += scaling(args, s)
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        atomic_write_text(args.out, report + "\n")
    return report


if __name__ == "__main__":
    main()
