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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lalora.config import Params, load_params
from lalora.core.io import atomic_write_text
from lalora.core.metrics import score
from lalora.core.search import SearchError, maximise_log10
from lalora.data.files import read_split
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
from lalora.models.adapters import adapter_lora_weights, lora_modules
from lalora.models.classifier import answer_token_ids
from lalora.models.pipeline import batches, load_adapted, logits_fn


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


@dataclass
class Checkpoint:
    """A checkpoint's model and prompts, as the bench reads them from the study's artifacts:
    the LoRA ``mods`` with their weights and the differences ``delta`` to each prior mean
    (zero, the initialisation), the training and test batches, the test ``labels``; ``dual0``
    the exact GGN's dual form (filled by :func:`exact_rows`), ``ref_var`` each prior mean's
    exact full-GGN lambda and per-example variance (the ratio column's reference)."""

    params: Params
    model: nn.Module
    mods: dict
    fn: object
    train: list
    test: list
    n_train: int
    labels: torch.Tensor
    init: dict
    weights: dict = field(default_factory=dict)
    delta: dict = field(default_factory=dict)
    dual0: object = None
    qv: torch.Tensor | None = None
    exact_qv: float = 0.0
    ref_var: dict = field(default_factory=dict)


def load(args: argparse.Namespace) -> Checkpoint:
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
    ck = Checkpoint(
        params, model, mods, fn, list(batches(tok, train_ex, bs, max_len)),
        list(batches(tok, test_ex, params.evaluate.batch_size, max_len)), len(train_ex),
        torch.tensor([e.label for e in test_ex]), init,
    )  # fmt: skip
    ck.weights = {n: m.weight.detach().double() for n, m in mods.items()}
    ck.delta = {
        "zero": ck.weights,
        "init": {n: w - init[n].double() for n, w in ck.weights.items()},
    }
    print(f"{len(train_ex)} train, {len(test_ex)} test prompts", file=sys.stderr)
    return ck


def exact_rows(ck: Checkpoint, means: list[str], link: str) -> list[Row]:
    """The exact GGN's rows: full and block-diagonal, each prior mean, each evidence."""
    ck.dual0 = exact.dual_ggn(ck.model, ck.train, ck.test, ck.fn, ck.mods, progress=True,
                              other_means={"init": ck.init})  # fmt: skip
    dual0 = ck.dual0
    duals = {"zero": dual0, "init": dual0.centred_at("init")}
    # the exact GGN's trace per module: tr(J_g^T W J_g) = tr(S^T Gram_g S)
    exact_trace = torch.diagonal(exact._sandwich(dual0.gram, dual0.root), dim1=-2, dim2=-1).sum(-1)
    ck.qv = torch.tensor([".lm_head." not in f".{n}" for n in dual0.names])
    ck.exact_qv = float(exact_trace[ck.qv].sum())
    symmetric = {k: remove_symmetry(ck.weights, d) for k, d in ck.delta.items()}
    rows: list[Row] = []
    for structure in ("full", "block"):
        for mean_name in means:
            evidences = ["standard", "linear"]
            if structure == "full":
                evidences += ["linear_mode", "standard, symmetry removed"]
            for evidence in evidences:
                row = _exact_row(ck, duals[mean_name], symmetric[mean_name], structure,
                                 mean_name, evidence, link)  # fmt: skip
                if row is not None:
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
    return rows


def _exact_row(ck: Checkpoint, dual, rest: dict, structure: str, mean_name: str, evidence: str,
               link: str) -> Row | None:  # fmt: skip
    """One exact row: lambda by ``evidence`` (``standard, symmetry removed``: the standard
    evidence with theta* - mu without its part along the LoRA symmetry, ``rest``)."""
    pr, samples, seed = ck.params.prior, ck.params.predictive.samples, ck.params.predictive.seed
    d_ev, ev = dual, evidence
    if evidence == "standard, symmetry removed":
        d_ev = dual.with_prior_mean_sq(
            torch.tensor([float(rest[n].pow(2).sum()) for n in dual.names])
        )
        ev = "standard"
    try:
        lam = exact.tune_prior(
            d_ev, structure, pr.log10_min, pr.log10_max, pr.grid, evidence=ev, accept_edge=True,
        )  # fmt: skip
    except SearchError as err:
        print(f"exact {structure} {mean_name} {evidence}: {err}", file=sys.stderr)
        return None
    cov = exact.logit_covariance(dual, lam, structure)
    if structure == "full" and evidence == "standard":
        ck.ref_var[mean_name] = (lam, torch.diagonal(cov, dim1=1, dim2=2).sum(1))
    ref_lam, ref = ck.ref_var[mean_name]
    same = exact.logit_covariance(dual, ref_lam, structure)
    ratio = float((torch.diagonal(same, dim1=1, dim2=2).sum(1) / ref).median())
    sc = score(predictive_probs(dual.test_mean, cov, link, samples, seed), ck.labels)
    best = "-"
    if evidence == "standard":
        best = best_test_lambda(
            lambda x, d=dual, st=structure: exact.logit_covariance(d, x, st),
            dual.test_mean, ck.labels, link, samples, seed, pr.log10_min, pr.log10_max,
        )  # fmt: skip
    log_z = (
        exact.linear_model_evidence(d_ev, lam).log_z
        if ev == "linear_mode"
        else exact.log_marginal_likelihood(d_ev, lam, structure, ev)
    )
    return Row(
        f"exact GGN, {structure}", mean_name, evidence, 1.0, lam, log_z,
        exact.effective_dimension(dual, lam, structure),
        float(torch.diagonal(cov, dim1=1, dim2=2).mean()), ratio, sc.acc, sc.nll, sc.ece, best,
    )  # fmt: skip


def kfac_rows(ck: Checkpoint, args: argparse.Namespace) -> list[Row]:
    """The Kronecker rows: each variant (``--kfac``), normalisation, prior mean, prior
    structure and evidence."""
    cfg = ck.params.kfac
    variants = {
        "lowrank": (f"KFAC, rank {cfg.rank} beyond 256", 256),
        "dense": (f"KFAC, dense to {cfg.max_dense}", cfg.max_dense),
    }
    rows: list[Row] = []
    for label, threshold in (variants[v] for v in args.kfac):
        fits = {
            norm: fit_kfac(
                ck.model, ck.train, ck.fn, ck.mods, cfg.fisher, cfg.rank, threshold, cfg.update,
                cfg.seed, progress=True, total=len(ck.train), normalisation=norm,
            )
            for norm in ("rows", "sequences_padded")
        }  # fmt: skip
        fits["sequences"] = renormalise(fits["rows"], "sequences")
        rows_feats = jacobian_features(ck.model, ck.test, ck.fn, ck.mods, fits["rows"],
                                       progress=True, total=len(ck.test))  # fmt: skip
        for norm in args.normalisations:
            post = fits[norm]
            try:
                feats = rebase_features(rows_feats, fits["rows"], post)
            except ValueError:  # a low-rank side changed: a pass with these factors
                feats = jacobian_features(ck.model, ck.test, ck.fn, ck.mods, post)
            for mean_name in args.means:
                rows += _kfac_rows(ck, f"{label}, {norm}", post, feats, norm, mean_name, args.link)
    return rows


def _kfac_rows(ck: Checkpoint, label: str, post: Posterior, feats, norm: str, mean_name: str,
               link: str) -> list[Row]:  # fmt: skip
    pr, samples, seed = ck.params.prior, ck.params.predictive.samples, ck.params.predictive.seed
    trace = [float(m.a.evals.sum() * m.g.evals.sum()) for m in post.modules.values()]
    trace_qv = sum(t for t, q in zip(trace, ck.qv.tolist(), strict=True) if q)
    base = post.with_delta(ck.delta[mean_name])
    combos = [("scalar", "standard"), ("scalar", "linear")]
    if norm == "rows":
        combos.append(("layerwise", "standard"))
    rows = []
    for structure, evidence in combos:
        tuned = tune_kfac(base, structure, pr.log10_min, pr.log10_max, pr.grid,
                          accept_edge=True, evidence=evidence)  # fmt: skip
        cov = logit_covariance(feats, tuned)
        ref_lam, ref = ck.ref_var[mean_name]
        same = logit_covariance(feats, base.with_prior(ref_lam))
        ratio = float((torch.diagonal(same, dim1=1, dim2=2).sum(1) / ref).median())
        sc = score(predictive_probs(feats.mean, cov, link, samples, seed), ck.labels)
        lam_values = list(tuned.prior_precision.values())
        best = "-"
        if structure == "scalar" and evidence == "standard":
            best = best_test_lambda(
                lambda x, b=base, f=feats: logit_covariance(f, b.with_prior(x)),
                feats.mean, ck.labels, link, samples, seed, pr.log10_min, pr.log10_max,
            )  # fmt: skip
        rows.append(Row(
            f"{label}, {structure} prior", mean_name, evidence,
            trace_qv / max(ck.exact_qv, 1e-300),
            math.exp(sum(math.log(v) for v in lam_values) / len(lam_values)),
            log_marginal_likelihood(tuned, evidence=evidence), kfac_gamma(tuned),
            float(torch.diagonal(cov, dim1=1, dim2=2).mean()), ratio, sc.acc, sc.nll, sc.ece, best,
        ))  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def report(ck: Checkpoint, args: argparse.Namespace, rows: list[Row], seconds: float) -> str:
    """The markdown table, with the command and the checkpoint's figures above it."""
    map_s = score(torch.softmax(ck.dual0.test_mean, -1), ck.labels)
    sq = {k: sum(float(d[n].pow(2).sum()) for n in d) for k, d in ck.delta.items()}
    symmetry = lora_symmetry(ck.weights, ck.delta["init"])["share"]
    lines = [
        f"# Kronecker against exact Laplace: {args.model}, step {args.step}",
        "",
        f"`python -m bench.exact_laplace --model {args.model} --step {args.step}"
        f" --n-train {args.n_train} --n-test {args.n_test} --link {args.link}"
        f" --kfac {' '.join(args.kfac)} --normalisations {' '.join(args.normalisations)}"
        f" --means {' '.join(args.means)}{where_from(args)}`: "
        f"{ck.n_train} training prompts (factors, GGN, log Z), {len(ck.labels)} test prompts, "
        f"P = {int(ck.dual0.n_params.sum())} LoRA weights, {args.link} link, "
        f"{seconds:.0f} s. MAP: ACC {map_s.acc:.3f}, NLL {map_s.nll:.3f}, "
        f"ECE {map_s.ece:.3f}. ||theta*||^2 = {sq['zero']:.1f}, "
        f"||theta* - theta_init||^2 = {sq['init']:.1f}; its share along the "
        f"LoRA symmetry directions {symmetry:.3f}.",
        "",
        LEGEND,
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
    return "\n".join(lines) + "\n"


LEGEND = (
    "lambda: the prior precision maximising the row's evidence (geometric mean for "
    "layerwise; standard, linear = the quadratic data term at theta*, linear_mode = the "
    "linearised model with the softmax likelihood at its own mode, symmetry removed = "
    "theta* - mu without its part along the LoRA symmetry directions); trace: tr(A (x) G) "
    "over the q/v modules against the exact GGN's; gamma: effective dimension; var: mean "
    "contrast variance; ratio: median per-example variance against the exact full GGN at "
    "its standard lambda (same prior mean); best lambda: lowest test NLL."
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    ck = load(args)
    rows = exact_rows(ck, args.means, args.link)
    rows += kfac_rows(ck, args)
    text = report(ck, args, rows, time.time() - t0)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
