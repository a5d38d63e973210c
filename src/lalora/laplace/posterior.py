"""The Laplace posterior over LoRA weights: per-module Kronecker factors, prior, MAP norms.

Posterior precision per module m: A_m (x) G_m + lambda_m I (block-diagonal over modules), vec
column-major so that vec(g a^T) = a (x) g. Nothing of size P x P is ever formed: memory is
O(sum_m k * d_large + d_small^2). Saved as ``factors.safetensors`` plus ``posterior.json``; a
factor object shared by several modules (LoRA-A maps reading the same input) is stored once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lalora.io import atomic_write_json
from lalora.laplace.kron import Factor

FORMAT_VERSION = 2  # 2: a factor shared by several modules is stored once ("same_as")


@dataclass(frozen=True)
class ModuleFactors:
    """Kronecker factors of one LoRA linear map with weight (d_out, d_in).

    ``a``: input factor (side d_in); ``g``: output-gradient factor (side d_out);
    ``theta_sq``: squared norm of the MAP weights of this module; ``n_rows``: input rows seen.
    """

    a: Factor
    g: Factor
    theta_sq: float
    n_rows: int

    @property
    def n_params(self) -> int:
        return self.a.dim * self.g.dim


@dataclass(frozen=True)
class Posterior:
    """Factors by module name, the data size and (after tuning) the prior precision(s)."""

    modules: dict[str, ModuleFactors]
    n_data: int
    fisher: str
    prior_precision: dict[str, float] = field(default_factory=dict)
    log_likelihood: float = 0.0

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

    def with_theta_sq(self, theta_sq: dict[str, float]) -> Posterior:
        """A copy with ||theta*_m - mu_m||^2 per module for a prior centred at mu (e.g. the
        LoRA initialisation) instead of zero; only log Z depends on it."""
        missing = set(self.modules) - set(theta_sq)
        if missing:
            raise ValueError(f"squared distance missing for modules {sorted(missing)[:3]}...")
        modules = {n: replace(m, theta_sq=float(theta_sq[n])) for n, m in self.modules.items()}
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
                "prior_precision": self.prior_precision,
                "same_as": same_as,
                "modules": {
                    n: {"theta_sq": m.theta_sq, "n_rows": m.n_rows} for n, m in self.modules.items()
                },
            },
        )

    @staticmethod
    def load(folder: str | Path) -> Posterior:
        folder = Path(folder)
        meta_path = folder / "posterior.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no posterior in {folder} (posterior.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(
                f"{meta_path}: format version {meta.get('format_version')}, "
                f"expected {FORMAT_VERSION}"
            )
        tensors = load_file(str(folder / "factors.safetensors"))
        same_as = meta.get("same_as", {})
        loaded: dict[str, Factor] = {}

        def factor(key: str) -> Factor:
            key = same_as.get(key, key)
            if key not in loaded:
                loaded[key] = Factor(tensors[f"{key}/evecs"], tensors[f"{key}/evals"])
            return loaded[key]

        modules = {}
        for name, info in meta["modules"].items():
            sides = {s: factor(f"{name}/{s}") for s in ("a", "g")}
            modules[name] = ModuleFactors(
                a=sides["a"], g=sides["g"], theta_sq=info["theta_sq"], n_rows=info["n_rows"]
            )
        return Posterior(
            modules=modules,
            n_data=meta["n_data"],
            fisher=meta["fisher"],
            prior_precision={k: float(v) for k, v in meta["prior_precision"].items()},
            log_likelihood=meta["log_likelihood"],
        )


def dense_precision(post: Posterior, name: str) -> torch.Tensor:
    """(P_m, P_m) posterior precision of one module (tests on tiny modules only)."""
    m = post.modules[name]
    lam = post.prior_precision[name]
    return torch.kron(m.a.dense(), m.g.dense()) + lam * torch.eye(m.n_params, dtype=torch.float64)
