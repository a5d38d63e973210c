"""The Kronecker Laplace posterior against the exact full-GGN Laplace on a real checkpoint.

    python -m bench.exact_laplace --model smollm2-135m --step 200       # after `dvc repro`
    python -m bench.exact_laplace --step 200 --n-train 160 --n-test 200 --out /tmp/exact.md

Reads the pipeline's artifacts (``params.yaml``, ``data/<dataset>/{train,test}.jsonl``,
``models/<model>/<dataset>/adapters/step-<N>`` and ``step-0``, the LoRA initialisation). For each
posterior (KFAC as configured, KFAC with every side up to 4096 dense, the exact block-diagonal GGN,
the exact full GGN, all over every LoRA weight and the same training prompts) and each prior mean
(zero; the LoRA initialisation), the prior precision is tuned by the marginal likelihood, and the
table gives lambda, log Z, the effective dimension gamma, the mean contrast variance on the test
prompts, the median ratio of each example's variance to the exact full GGN's at the same lambda, and
ACC / NLL / ECE of the linearised predictive. The last column is the scalar lambda with the lowest
test NLL (an oracle, not a method): whether any isotropic prior would calibrate.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lalora.adapters import adapter_lora_weights, lora_modules
from lalora.classifier import answer_token_ids
from lalora.config import load_params
from lalora.data import read_split
from lalora.io import atomic_write_text
from lalora.laplace import exact
from lalora.laplace.diagnostics import lora_symmetry, remove_symmetry
from lalora.laplace.kfac import fit_kfac, renormalise
from lalora.laplace.marglik import log_marginal_likelihood
from lalora.laplace.marglik import tune_prior as tune_kfac
from lalora.laplace.posterior import Posterior
from lalora.laplace.predictive import (
    jacobian_features,
    logit_covariance,
    predictive_probs,
    rebase_features,
)
from lalora.metrics import score
from lalora.pipeline import batches, load_adapted, logits_fn
from lalora.search import SearchError, maximise_log10


@dataclass(frozen=True)
class Row:
    posterior: str
    mean: str
    evidence: str
    trace: float
    lam: float
    log_z: float
    gamma: float
    var: float
    ratio: float
    acc: float
    nll: float
    ece: float
    best_lam: str


def kfac_gamma(post: Posterior) -> float:
    """sum over kept eigenvalue products of h / (h + lambda)."""
    total = 0.0
    for n, m in post.modules.items():
        h = torch.outer(m.a.evals, m.g.evals)
        total += float((h / (h + post.prior_precision[n])).sum())
    return total


def best_test_lambda(cov_at, mean, labels, link, samples, seed, lo, hi) -> str:
    """The scalar lambda minimising the test NLL (reported, with the edge named if unbracketed)."""

    def objective(x: float) -> float:
        p = predictive_probs(mean, cov_at(10.0**x), link, samples, seed)
        return float(p.gather(1, labels[:, None]).clamp(min=1e-300).log().mean())

    try:
        res = maximise_log10(objective, lo, hi, 21, "test NLL")
    except SearchError:
        ys = [objective(lo), objective(hi)]
        return f"edge 1e{lo:g}" if ys[0] > ys[1] else f"edge 1e{hi:g} (MAP)"
    return f"{10.0**res.log10:.3g}"


def where_from(args: argparse.Namespace) -> str:
    """The command line's input options where they are not the defaults."""
    out = ""
    for flag, value, default in (
        ("--params", str(args.params), "params.yaml"),
        ("--models-dir", str(args.models_dir), "models"),
        ("--data-dir", str(args.data_dir), "data"),
    ):
        if value != default:
            out += f" {flag} {value}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=None, help="default: the first of params' datasets")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--n-train", type=int, default=0, help="0: the whole training split")
    parser.add_argument("--n-test", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--link", default="probit", help="predictive link for the table")
    parser.add_argument(
        "--kfac",
        nargs="+",
        default=["lowrank", "dense"],
        choices=("lowrank", "dense"),
        help="KFAC variants: rank-k sides beyond 256, and dense sides up to kfac.max_dense",
    )
    parser.add_argument(
        "--normalisations", nargs="+", default=["rows", "sequences", "sequences_padded"],
        choices=("rows", "sequences", "sequences_padded"),
    )  # fmt: skip
    parser.add_argument("--means", nargs="+", default=["zero", "init"], choices=("zero", "init"))
    parser.add_argument("--out", type=Path, default=Path("bench/exact_laplace.md"))
    args = parser.parse_args()

    t0 = time.time()
    params = load_params(args.params)
    dataset = args.dataset or params.datasets[0]
    params.dataset(dataset)  # a clear error for an unknown name
    card = params.card(args.model)
    root = args.models_dir / args.model / dataset / "adapters"
    tok, model = load_adapted(card, root / f"step-{args.step}")
    mods = lora_modules(model)
    init = adapter_lora_weights(root / "step-0", list(mods))
    train_split = read_split(args.data_dir / dataset / "train.jsonl")
    test_split = read_split(args.data_dir / dataset / "test.jsonl")
    train_ex = list(train_split.examples)[: args.n_train or None]
    test_ex = list(test_split.examples)[: args.n_test or None]
    fn = logits_fn(answer_token_ids(tok, train_split.answers))
    bs, max_len = params.kfac.batch_size, params.finetune.max_length
    train = list(batches(tok, train_ex, bs, max_len))
    test = list(batches(tok, test_ex, params.evaluate.batch_size, max_len))
    labels = torch.tensor([e.label for e in test_ex])
    pr, link = params.prior, args.link
    samples, seed = params.predictive.samples, params.predictive.seed
    print(f"{len(train_ex)} train, {len(test_ex)} test prompts", file=sys.stderr)

    dual0 = exact.dual_ggn(model, train, test, fn, mods, progress=True, other_means={"init": init})
    weights = {n: m.weight.detach().double() for n, m in mods.items()}
    delta = {"zero": weights, "init": {n: w - init[n].double() for n, w in weights.items()}}
    sq = {k: {n: float(d[n].pow(2).sum()) for n in d} for k, d in delta.items()}

    duals = {"zero": dual0, "init": dual0.centred_at("init")}
    # the exact GGN's trace per module: tr(J_g^T W J_g) = tr(S^T Gram_g S)
    exact_trace = torch.diagonal(exact._sandwich(dual0.gram, dual0.root), dim1=-2, dim2=-1).sum(-1)
    qv = torch.tensor([".lm_head." not in f".{n}" for n in dual0.names])
    exact_qv = float(exact_trace[qv].sum())
    symmetric = {k: remove_symmetry(weights, d) for k, d in delta.items()}
    rows: list[Row] = []
    ref_var: dict[str, tuple[float, torch.Tensor]] = {}
    for structure in ("full", "block"):
        for mean_name in args.means:
            dual = duals[mean_name]
            evidences = ["standard", "linear"]
            if structure == "full":
                evidences += ["linear_mode", "standard, symmetry removed"]
            for evidence in evidences:
                d_ev = dual
                ev = evidence
                if evidence == "standard, symmetry removed":
                    rest = symmetric[mean_name]
                    d_ev = dual.with_prior_mean_sq(
                        torch.tensor([float(rest[n].pow(2).sum()) for n in dual.names])
                    )
                    ev = "standard"
                try:
                    lam = exact.tune_prior(
                        d_ev, structure, pr.log10_min, pr.log10_max, pr.grid, evidence=ev,
                        accept_edge=True,
                    )  # fmt: skip
                except SearchError as err:
                    print(f"exact {structure} {mean_name} {evidence}: {err}", file=sys.stderr)
                    continue
                cov = exact.logit_covariance(dual, lam, structure)
                if structure == "full" and evidence == "standard":
                    ref_var[mean_name] = (lam, torch.diagonal(cov, dim1=1, dim2=2).sum(1))
                ref_lam, ref = ref_var[mean_name]
                same = exact.logit_covariance(dual, ref_lam, structure)
                ratio = float((torch.diagonal(same, dim1=1, dim2=2).sum(1) / ref).median())
                p = predictive_probs(dual.test_mean, cov, link, samples, seed)
                sc = score(p, labels)
                best = "-"
                if evidence == "standard":
                    best = best_test_lambda(
                        lambda x, d=dual, st=structure: exact.logit_covariance(d, x, st),
                        dual.test_mean, labels, link, samples, seed, pr.log10_min, pr.log10_max,
                    )  # fmt: skip
                log_z = (
                    exact.linear_model_evidence(d_ev, lam).log_z
                    if ev == "linear_mode"
                    else exact.log_marginal_likelihood(d_ev, lam, structure, ev)
                )
                rows.append(
                    Row(
                        f"exact GGN, {structure}", mean_name, evidence, 1.0, lam, log_z,
                        exact.effective_dimension(dual, lam, structure),
                        float(torch.diagonal(cov, dim1=1, dim2=2).mean()), ratio,
                        sc.acc, sc.nll, sc.ece, best,
                    )
                )  # fmt: skip
                print(rows[-1], file=sys.stderr, flush=True)

    kfac_cfg = params.kfac
    variants = {
        "lowrank": (f"KFAC, rank {kfac_cfg.rank} beyond 256", 256),
        "dense": (f"KFAC, dense to {kfac_cfg.max_dense}", kfac_cfg.max_dense),
    }
    variants = [variants[v] for v in args.kfac]
    for label, threshold in variants:
        fits = {
            norm: fit_kfac(
                model, train, fn, mods, kfac_cfg.fisher, kfac_cfg.rank, threshold,
                kfac_cfg.update, kfac_cfg.seed, progress=True, total=len(train),
                normalisation=norm,
            )
            for norm in ("rows", "sequences_padded")
        }  # fmt: skip
        fits["sequences"] = renormalise(fits["rows"], "sequences")
        rows_feats = jacobian_features(
            model, test, fn, mods, fits["rows"], progress=True, total=len(test)
        )
        for norm in args.normalisations:
            post = fits[norm]
            try:
                feats = rebase_features(rows_feats, fits["rows"], post)
            except ValueError:  # a low-rank side changed: a pass with these factors
                feats = jacobian_features(model, test, fn, mods, post)
            trace = [float(m.a.evals.sum() * m.g.evals.sum()) for m in post.modules.values()]
            trace_qv = sum(t for t, q in zip(trace, qv.tolist(), strict=True) if q)
            for mean_name in args.means:
                base = post.with_delta(delta[mean_name])
                combos = [("scalar", "standard"), ("scalar", "linear")]
                if norm == "rows":
                    combos.append(("layerwise", "standard"))
                for structure, evidence in combos:
                    tuned = tune_kfac(
                        base, structure, pr.log10_min, pr.log10_max, pr.grid,
                        accept_edge=True, evidence=evidence,
                    )  # fmt: skip
                    cov = logit_covariance(feats, tuned)
                    ref_lam, ref = ref_var[mean_name]
                    same = logit_covariance(feats, base.with_prior(ref_lam))
                    ratio = float((torch.diagonal(same, dim1=1, dim2=2).sum(1) / ref).median())
                    sc = score(predictive_probs(feats.mean, cov, link, samples, seed), labels)
                    lam_values = list(tuned.prior_precision.values())
                    best = "-"
                    if structure == "scalar" and evidence == "standard":
                        best = best_test_lambda(
                            lambda x, b=base, f=feats: logit_covariance(f, b.with_prior(x)),
                            feats.mean, labels, link, samples, seed, pr.log10_min, pr.log10_max,
                        )  # fmt: skip
                    rows.append(
                        Row(
                            f"{label}, {norm}, {structure} prior", mean_name, evidence,
                            trace_qv / max(exact_qv, 1e-300),
                            math.exp(sum(math.log(v) for v in lam_values) / len(lam_values)),
                            log_marginal_likelihood(tuned, evidence=evidence),
                            kfac_gamma(tuned),
                            float(torch.diagonal(cov, dim1=1, dim2=2).mean()), ratio,
                            sc.acc, sc.nll, sc.ece, best,
                        )
                    )  # fmt: skip
                    print(rows[-1], file=sys.stderr, flush=True)

    map_s = score(torch.softmax(dual0.test_mean, -1), labels)
    lines = [
        f"# Kronecker against exact Laplace: {args.model}, step {args.step}",
        "",
        f"`python -m bench.exact_laplace --model {args.model} --step {args.step}"
        f" --n-train {args.n_train} --n-test {args.n_test} --link {link}"
        f" --kfac {' '.join(args.kfac)} --normalisations {' '.join(args.normalisations)}"
        f" --means {' '.join(args.means)}{where_from(args)}`: "
        f"{len(train_ex)} training prompts (factors, GGN, log Z), {len(test_ex)} test prompts, "
        f"P = {int(dual0.n_params.sum())} LoRA weights, {link} link, "
        f"{time.time() - t0:.0f} s. MAP: ACC {map_s.acc:.3f}, NLL {map_s.nll:.3f}, "
        f"ECE {map_s.ece:.3f}. ||theta*||^2 = {sum(sq['zero'].values()):.1f}, "
        f"||theta* - theta_init||^2 = {sum(sq['init'].values()):.1f}; its share along the "
        f"LoRA symmetry directions {lora_symmetry(weights, delta['init'])['share']:.3f}.",
        "",
        "lambda: the prior precision maximising the row's evidence (geometric mean for "
        "layerwise; standard, linear = the quadratic data term at theta*, linear_mode = the "
        "linearised model with the softmax likelihood at its own mode, symmetry removed = "
        "theta* - mu without its part along the LoRA symmetry directions); trace: tr(A (x) G) "
        "over the q/v modules against the exact GGN's; gamma: effective dimension; var: mean "
        "contrast variance; ratio: median per-example variance against the exact full GGN at "
        "its standard lambda (same prior mean); best lambda: lowest test NLL.",
        "",
        "| posterior | prior mean | evidence | trace | lambda | log Z | gamma | var | ratio "
        "| ACC | NLL | ECE | best lambda |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.posterior} | {r.mean} | {r.evidence} | {r.trace:.2f} | {r.lam:.3g} | "
            f"{r.log_z:.1f} | {r.gamma:.1f} | "
            f"{r.var:.3g} | {r.ratio:.3f} | {r.acc:.3f} | {r.nll:.3f} | {r.ece:.3f} | "
            f"{r.best_lam} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
