"""Evaluate one checkpoint on one test split with every method of the comparison.

One forward and C - 1 backward passes per batch give the MAP logits and the Jacobians from which
the linearised predictive of every Laplace posterior is computed (the configured one, LA with the
marginal-likelihood prior, LA with the validation-NLL prior, LLLA on the ``lm_head`` LoRA);
temperature scaling divides them by the temperature ``tune_prior`` fitted on the validation
split's MAP logits (read from the prior file, so the validation split is not run again); MC
dropout runs its own passes. The model is loaded once per stage: ``shift`` passes the loaded
model to every target.
Used by the ``evaluate`` stage (the dataset's own test split) and the ``shift`` stage (other
datasets' test splits).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lalora.config import Params
from lalora.core.errors import ArtifactError
from lalora.core.io import read_json
from lalora.core.metrics import check_finite, score
from lalora.data.files import read_split
from lalora.laplace import Posterior, predict_covariances, predictive_probs
from lalora.models.baselines import mc_dropout_probs
from lalora.models.pipeline import load_split_run
from lalora.runtime.distributed import SINGLE, Dist

LAPLACE_METHODS = ("la", "la_val", "llla")


def configured_method(prior_method: str) -> str:
    """The method key of the configured Laplace posterior: ``la`` for a marginal-likelihood
    prior, ``la_val`` for a validation-NLL one."""
    return "la" if prior_method == "marglik" else "la_val"


@dataclass(frozen=True)
class Evaluation:
    """Predictive probabilities (N, C) per method, labels (N,), example ids, the tuned prior
    file's content, fitted quantities (``info``: the temperature), the configured Laplace
    posterior's method key (``la`` or ``la_val``) and its contrast covariance (N, K, K)."""

    probs: dict[str, Tensor]
    labels: Tensor
    ids: list[str]
    prior: dict
    info: dict
    laplace: str
    cov: Tensor

    def scores(self, n_bins: int) -> dict[str, dict]:
        """``{method: acc, nll, ece, brier, n, bins}`` (:func:`lalora.core.metrics.score`)."""
        return {m: score(p, self.labels, n_bins).to_dict() for m, p in self.probs.items()}

    def record(self, model: str, dataset: str, step: int, n_bins: int) -> dict:
        """The metrics file of the evaluate stage: every method's scores, the configured
        prior (its precision, log Z, method, structure, mean, at_edge), the configured
        posterior's key, its mean logit variance and the fitted quantities; checked finite."""
        prior = self.prior
        out: dict = {"model": model, "dataset": dataset, "step": step}
        out |= self.scores(n_bins)
        out["prior_precision"] = prior["prior_precision"]
        out["log_marginal_likelihood"] = prior["log_marginal_likelihood"]
        out["prior"] = {k: prior.get(k) for k in ("method", "structure", "mean", "at_edge")}
        out["laplace_method"] = self.laplace  # the configured posterior's key: la or la_val
        out["mean_logit_variance"] = float(torch.diagonal(self.cov, dim1=1, dim2=2).mean())
        out["methods"] = sorted(self.probs)
        out["info"] = self.info
        check_finite(out, f"evaluate {model} {dataset} step {step}")
        return out


def posteriors(kfac: Path, prior_path: Path, prior: dict, methods: tuple[str, ...]) -> dict:
    """The tuned posteriors to evaluate, each once: the configured one (under its method key,
    :func:`configured_method`) and each Laplace method of ``methods`` that tune_prior computed
    (LLLA restricted to the lm_head LoRA)."""
    base = Posterior.load(kfac)
    tuned = prior.get("methods", {})
    if prior.get("method") not in ("marglik", "val_nll"):
        what = f"unknown prior method {prior.get('method')!r}"
        raise ArtifactError(prior_path, what, "tune_prior")
    configured = configured_method(prior["method"])
    wanted = {configured: prior} | {
        m: tuned.get(m) for m in methods if m in LAPLACE_METHODS and m != configured
    }
    out = {}
    for key, entry in wanted.items():
        if entry is None:
            if key == "llla":
                print("llla: the model has no lm_head LoRA; skipped", file=sys.stderr)
                continue
            raise ArtifactError(prior_path, f"no tuned prior for {key}", "tune_prior")
        try:
            by_module = entry["prior_precision_by_module"]
            post = base.restrict(list(by_module)).with_prior(by_module)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(
                prior_path, f"malformed ({type(err).__name__}: {err})", "tune_prior"
            ) from None
        if not all(math.isfinite(v) for v in post.prior_precision.values()):
            raise ArtifactError(prior_path, f"non-finite prior precision ({key})", "tune_prior")
        out[key] = post
    return out


def temperature(prior: dict, prior_path: Path) -> dict:
    """The temperature that ``tune_prior`` fitted on the validation logits, ``{"T", "at_edge"}``;
    an ArtifactError when it has none (no validation split)."""
    found = prior.get("temperature")
    if not isinstance(found, dict) or not isinstance(found.get("T"), int | float):
        raise ArtifactError(
            prior_path,
            "no fitted temperature: temperature scaling needs a validation split (set "
            "data.<dataset>.val_size > 0, or drop temperature from evaluate.methods)",
            "tune_prior",
        )
    return {"T": float(found["T"]), "at_edge": found.get("at_edge")}


def evaluate_split(
    params: Params,
    model_name: str,
    adapter: Path,
    kfac: Path,
    prior_path: Path,
    test: Path,
    dist: Dist | None = None,
    loaded: tuple | None = None,
) -> Evaluation:
    """Every method of ``params.evaluate.methods`` (and MAP, and the configured Laplace
    posterior) on the prepared split ``test``. ``loaded``: the (tokenizer, model) of
    :func:`lalora.models.pipeline.load_adapted` for ``adapter``, when the caller has it (else it is
    loaded here). With ``dist`` the batches are split over the processes and every process
    returns the whole evaluation."""
    d = dist or SINGLE
    cfg, pred = params.evaluate, params.predictive
    prior = read_json(prior_path, "tune_prior")
    posts = posteriors(kfac, prior_path, prior, cfg.methods)
    stage = "evaluate" if loaded is None else None  # a caller that loaded it checked memory
    run = load_split_run(params, model_name, adapter, test, cfg.batch_size, loaded, stage)
    mean, covs = predict_covariances(
        run.model, run.batches, run.logits_fn, run.modules, posts, progress=d.main, dist=d
    )
    probs = {"map": torch.softmax(mean, -1)}
    for key, cov in covs.items():
        probs[key] = predictive_probs(mean, cov, pred.link, pred.samples, pred.seed)
    info: dict = {"truncated": run.truncated}
    if "temperature" in cfg.methods:
        info["temperature"] = temperature(prior, prior_path)
        probs["temperature"] = torch.softmax(mean / info["temperature"]["T"], -1)
    if "mc_dropout" in cfg.methods:
        probs["mc_dropout"] = mc_dropout_probs(
            run.model, run.batches, run.logits_fn, cfg.mc_samples, pred.seed, dist=d
        )
    ids = [e.id for e in read_split(test).examples]
    laplace = configured_method(prior["method"])
    return Evaluation(probs, run.labels, ids, prior, info, laplace, covs[laplace])
