"""The Laplace sections: factors, prior, predictive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lalora.config.base import (
    ConfigError,
    _conf_defaults,
)


@dataclass(frozen=True)
@_conf_defaults(
    "kfac",
)
class KfacConfig:
    """Kronecker factors: Fisher type, low-rank update, rank ``k``; sides up to ``max_dense`` are
    kept dense (exact), larger ones low-rank; ``normalisation``: what divides the input factor
    (``rows``: the non-padding rows; ``sequences``, ``sequences_padded``: the number of
    sequences, the latter with padding rows summed in, as the paper's code has it)."""

    fisher: Literal["exact", "mc", "empirical"]
    update: Literal["svd", "nystrom"]
    rank: int
    max_dense: int
    batch_size: int
    seed: int
    normalisation: Literal["rows", "sequences", "sequences_padded"]

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.max_dense < 0 or self.batch_size <= 0:
            raise ConfigError("kfac.rank and kfac.batch_size must be positive, kfac.max_dense >= 0")


@dataclass(frozen=True)
@_conf_defaults(
    "prior",
)
class PriorConfig:
    """The prior N(mu, 1/lambda): precision tuned by marginal likelihood or validation NLL,
    one for all weights (``scalar``) or one per LoRA module (``layerwise``); centred at zero or
    at the LoRA initialisation (``mean: init``, the step-0 adapter: random A, zero B); the
    marginal likelihood is the ``standard`` Laplace evidence or the linearised model's
    (``evidence: linear``, Antoran et al. 2022: the prior penalises theta* - mu only where the
    data constrain it)."""

    method: Literal["marglik", "val_nll"]
    evidence: Literal["standard", "linear"]
    structure: Literal["scalar", "layerwise"]
    mean: Literal["zero", "init"]
    log10_min: float
    log10_max: float
    grid: int

    def __post_init__(self) -> None:
        if not self.log10_min < self.log10_max or self.grid < 3:
            raise ConfigError("prior: need log10_min < log10_max and grid >= 3")


@dataclass(frozen=True)
@_conf_defaults(
    "predictive",
)
class PredictiveConfig:
    """Linearised predictive: Monte Carlo over the logit Gaussian, or probit."""

    link: Literal["mc", "probit"]
    samples: int
    seed: int

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ConfigError("predictive.samples must be positive")
