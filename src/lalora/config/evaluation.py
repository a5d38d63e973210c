"""The evaluation's section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lalora.config.base import (
    ConfigError,
    _conf_defaults,
)


@dataclass(frozen=True)
@_conf_defaults(
    "evaluate",
)
class EvaluateConfig:
    """MAP and Laplace evaluation, and the comparison's other methods.

    ``methods`` beyond MAP and the configured Laplace posterior: ``la`` (marginal-likelihood
    prior), ``la_val`` (validation-NLL prior), ``llla`` (the ``lm_head`` LoRA only),
    ``temperature`` (temperature scaling on the validation split), ``mc_dropout``
    (``mc_samples`` passes with the LoRA dropout on). ``ensemble_last``: the checkpoint
    ensemble averages the MAP of the last K checkpoints (all of them when fewer; 0: none).
    ``bootstrap``: resamples for the 95% intervals of the comparison table."""

    batch_size: int
    ece_bins: int
    methods: tuple[Literal["la", "la_val", "llla", "temperature", "mc_dropout"], ...]
    mc_samples: int
    ensemble_last: int
    bootstrap: int

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.ece_bins <= 0:
            raise ConfigError("evaluate.batch_size and evaluate.ece_bins must be positive")
        if self.mc_samples < 1 or self.ensemble_last < 0 or self.bootstrap < 10:
            raise ConfigError(
                "evaluate: need mc_samples >= 1, ensemble_last >= 0 and bootstrap >= 10"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"evaluate.methods repeats a method: {list(self.methods)}")
