"""The Laplace posterior over LoRA weights: per-module Kronecker factors, prior, MAP norms.

Posterior precision per module m: A_m (x) G_m + lambda_m I (block-diagonal over modules), vec
column-major so that vec(g a^T) = a (x) g. Nothing of size P x P is ever formed: memory is
O(sum_m k * d_large + d_small^2). Saved as ``factors.safetensors`` plus ``posterior.json``; a
factor object shared by several modules (LoRA-A maps reading the same input) is stored once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lalora.core.errors import ArtifactError
from lalora.core.io import atomic_write_json
from lalora.laplace.kron import Factor

FORMAT_VERSION = 2  # 2: a factor shared by several modules is stored once ("same_as")


@dataclass(frozen=True)
class ModuleFactors:
    """Kronecker factors of one LoRA linear map with weight (d_out, d_in).

    ``a``: input factor (side d_in); ``g``: output-gradient factor (side d_out);
    ``theta_sq``: ||theta*_m - mu_m||^2 (mu = 0 unless re-centred); ``n_rows``: input rows seen;
    ``delta``: (k_a, k_g) coordinates Q_a^T (theta*_m - mu_m)^T Q_g of the weights' distance to
    the prior mean in the kept Kronecker eigenbasis (eigenvalues a_i g_j), set by
    :meth:`Posterior.with_delta` for the linearised evidence; None until then.
    """

    a: Factor
    g: Factor
    theta_sq: float
    n_rows: int
    delta: torch.Tensor | None = None

    @property
    def n_params(self) -> int:
        return self.a.dim * self.g.dim


@dataclass(frozen=True)
class Posterior:
    """Factors by module name, the data size and (after tuning) the prior precision(s).

    ``normalisation``: what divided the input factors (:class:`lalora.laplace.kfac.Normalisation`);
    ``train_confidence``: the mean top-class probability on the training set; ``fisher_trace``:
    sum_n tr(diag p_n - p_n p_n^T), the total softmax curvature (it vanishes where the model fits
    every training prompt with certainty, and with it every factor G_m).
    """

    modules: dict[str, ModuleFactors]
    n_data: int
    fisher: str
    prior_precision: dict[str, float] = field(default_factory=dict)
    log_likelihood: float = 0.0
    normalisation: str = "rows"
    train_confidence: float = 0.0
    fisher_trace: float = 0.0

    @property
    def n_params(self) -> int:
        return sum(m.n_params for m in self.modules.values())

    @property
    def theta_sq(self) -> float:
        return sum(m.theta_sq for m in self.modules.values())

    def with_prior(self, precision: float | dict[str, float]) -> Posterior:
        """A copy with a scalar or per-module prior precision (every value > 0)."""
        if isinstance(precision, dict):
            missing = set(self.modules) - set(precision)
            if missing:
                raise ValueError(f"prior precision missing for modules {sorted(missing)[:3]}...")
            prior = {k: float(precision[k]) for k in self.modules}
        else:
            prior = dict.fromkeys(self.modules, float(precision))
        if any(not v > 0 for v in prior.values()):
            raise ValueError("prior precision must be positive")
        return replace(self, prior_precision=prior)

    def restrict(self, names: list[str]) -> Posterior:
        """The posterior of the modules ``names`` only (e.g. the last layer's, for LLLA), with
        their prior precisions if tuned; the data size and log-likelihood are kept."""
        missing = set(names) - set(self.modules)
        if missing:
            raise ValueError(f"no factors for modules {sorted(missing)[:3]}")
        return replace(
            self,
            modules={n: self.modules[n] for n in names},
            prior_precision={n: v for n, v in self.prior_precision.items() if n in names},
        )

    def with_theta_sq(self, theta_sq: dict[str, float]) -> Posterior:
        """A copy with ||theta*_m - mu_m||^2 per module for a prior centred at mu (e.g. the
        LoRA initialisation) instead of zero; only log Z depends on it."""
        missing = set(self.modules) - set(theta_sq)
        if missing:
            raise ValueError(f"squared distance missing for modules {sorted(missing)[:3]}...")
        modules = {
            n: replace(m, theta_sq=float(theta_sq[n]), delta=None) for n, m in self.modules.items()
        }
        return replace(self, modules=modules)

    def with_delta(self, delta: dict[str, torch.Tensor]) -> Posterior:
        """A copy centred at mu: ``delta[m]`` = theta*_m - mu_m (d_out, d_in) per module gives
        ``theta_sq`` and the eigenbasis coordinates ``delta`` of every module."""
        missing = set(self.modules) - set(delta)
        if missing:
            raise ValueError(f"weights missing for modules {sorted(missing)[:3]}...")
        modules = {}
        for n, m in self.modules.items():
            d = delta[n].double()
            if tuple(d.shape) != (m.g.dim, m.a.dim):
                raise ValueError(
                    f"module {n}: weights {tuple(d.shape)}, factors ({m.g.dim}, {m.a.dim})"
                )
            coords = m.a.evecs.T @ d.T @ m.g.evecs  # (k_a, k_g)
            modules[n] = replace(m, theta_sq=float(d.pow(2).sum()), delta=coords)
        return replace(self, modules=modules)

    def save(self, folder: str | Path) -> None:
        """``factors.safetensors`` + ``posterior.json`` (format version, names, scalars)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, stored, same_as = {}, {}, {}
        for name, m in self.modules.items():
            for side in ("a", "g"):
                f: Factor = getattr(m, side)
                key = f"{name}/{side}"
                if id(f) in stored:
                    same_as[key] = stored[id(f)]
                    continue
                stored[id(f)] = key
                tensors[f"{key}/evecs"] = f.evecs.contiguous()
                tensors[f"{key}/evals"] = f.evals.contiguous()
        tmp = folder / ".factors.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / "factors.safetensors")
        atomic_write_json(
            folder / "posterior.json",
            {
                "format_version": FORMAT_VERSION,
                "n_data": self.n_data,
                "fisher": self.fisher,
                "log_likelihood": self.log_likelihood,
                "normalisation": self.normalisation,
                "train_confidence": self.train_confidence,
                "fisher_trace": self.fisher_trace,
                "prior_precision": self.prior_precision,
                "same_as": same_as,
                "modules": {
                    n: {"theta_sq": m.theta_sq, "n_rows": m.n_rows} for n, m in self.modules.items()
                },
            },
        )

    @staticmethod
    def load(folder: str | Path, stage: str = "fit_kfac") -> Posterior:
        """Read a posterior saved by :meth:`save`. A missing, truncated or malformed file, or
        a non-finite or negative eigenvalue, raises :class:`ArtifactError` naming the file and
        the ``stage`` that writes it."""
        folder = Path(folder)
        meta_path, factors_path = folder / "posterior.json", folder / "factors.safetensors"
        meta = _read_meta(meta_path, stage)
        try:
            tensors = load_file(str(factors_path))
        except Exception as err:  # SafetensorError or OSError: truncated, missing, not ours
            raise ArtifactError(
                factors_path, f"unreadable ({type(err).__name__}: {err})", stage
            ) from None
        same_as = meta.get("same_as", {})
        loaded: dict[str, Factor] = {}  # one object per saved factor, shared as saved

        def factor(key: str) -> Factor:
            key = same_as.get(key, key)
            if key not in loaded:
                loaded[key] = _read_factor(tensors, key, factors_path, stage)
            return loaded[key]

        try:
            modules = {}
            for name, info in meta["modules"].items():
                sides = {s: factor(f"{name}/{s}") for s in ("a", "g")}
                modules[name] = ModuleFactors(
                    a=sides["a"], g=sides["g"], theta_sq=info["theta_sq"], n_rows=info["n_rows"]
                )
            post = Posterior(
                modules=modules,
                n_data=meta["n_data"],
                fisher=meta["fisher"],
                prior_precision={k: float(v) for k, v in meta["prior_precision"].items()},
                log_likelihood=meta["log_likelihood"],
                normalisation=meta.get("normalisation", "rows"),
                train_confidence=float(meta.get("train_confidence", 0.0)),
                fisher_trace=float(meta.get("fisher_trace", 0.0)),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ArtifactError(
                meta_path, f"malformed ({type(err).__name__}: {err})", stage
            ) from None
        scalars = [post.log_likelihood, *post.prior_precision.values()]
        scalars += [m.theta_sq for m in modules.values()]
        if not all(math.isfinite(v) for v in scalars):
            raise ArtifactError(meta_path, "non-finite values", stage)
        return post


def last_layer_modules(names: list[str] | dict) -> list[str]:
    """The LoRA modules of the output layer (``lm_head``): the last-layer Laplace's weights."""
    return [n for n in names if ".lm_head." in f".{n}"]


def dense_precision(post: Posterior, name: str) -> torch.Tensor:
    """(P_m, P_m) posterior precision of one module (tests on tiny modules only)."""
    m = post.modules[name]
    lam = post.prior_precision[name]
    return torch.kron(m.a.dense(), m.g.dense()) + lam * torch.eye(m.n_params, dtype=torch.float64)


def _read_meta(path: Path, stage: str) -> dict:
    """``posterior.json``: a dict of a known format version, else an ArtifactError."""
    if not path.exists():
        raise ArtifactError(path, "missing (no posterior in this folder)", stage)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(path, f"unreadable ({err})", stage) from None
    if not isinstance(meta, dict) or meta.get("format_version") not in (1, FORMAT_VERSION):
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ArtifactError(path, f"format version {version}, expected {FORMAT_VERSION}", stage)
    return meta


def _read_factor(tensors: dict[str, Tensor], key: str, path: Path, stage: str) -> Factor:
    """The factor saved under ``key`` (``<module>/a`` or ``<module>/g``): finite, with
    non-negative eigenvalues, else an ArtifactError naming ``path``."""
    try:
        evecs, evals = tensors[f"{key}/evecs"], tensors[f"{key}/evals"]
    except KeyError as err:
        raise ArtifactError(path, f"entry {err} missing", stage) from None
    if not (torch.isfinite(evecs).all() and torch.isfinite(evals).all()):
        raise ArtifactError(path, f"non-finite values in {key}", stage)
    if (evals < 0).any():
        raise ArtifactError(
            path,
            f"negative eigenvalue {float(evals.min()):.3g} in {key} (a Kronecker factor is "
            "positive semi-definite)",
            stage,
        )
    return Factor(evecs, evals)
