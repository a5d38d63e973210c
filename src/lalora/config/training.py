"""Fine-tuning, layer pruning and the deep ensemble's sections."""

from __future__ import annotations

from dataclasses import dataclass

from lalora.config.base import (
    ConfigError,
    _conf_defaults,
)


@dataclass(frozen=True)
@_conf_defaults(
    "finetune",
)
class FinetuneConfig:
    """LoRA fine-tuning (the report's Table 1): AdamW, linear schedule, checkpoints.
    ``lora_plus_ratio``: LoRA+ (Hayou, Ghosh and Yu 2024), the B maps train at
    ``lora_plus_ratio * lr``, the A maps (and any other trainable weight) at ``lr``; 1 is plain
    LoRA, one parameter group."""

    lr: float
    weight_decay: float
    batch_size: int
    max_length: int
    steps: int
    save_every: int
    warmup_steps: int
    seed: int
    lora_plus_ratio: float

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.save_every <= 0 or self.steps % self.save_every:
            raise ConfigError(
                f"finetune.steps ({self.steps}) must be a positive multiple of "
                f"finetune.save_every ({self.save_every})"
            )
        if self.batch_size <= 0 or self.lr <= 0 or self.max_length <= 0:
            raise ConfigError(
                f"finetune.batch_size, lr and max_length must be positive, got "
                f"{self.batch_size}, {self.lr} and {self.max_length}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.lora_plus_ratio > 0:
            raise ConfigError(
                f"finetune.lora_plus_ratio must be > 0 (1: plain LoRA), got {self.lora_plus_ratio}"
            )
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"finetune.warmup_steps must be in [0, steps = {self.steps}], "
                f"got {self.warmup_steps}"
            )

    @property
    def checkpoints(self) -> list[int]:
        """Steps at which a checkpoint is written: 0, save_every, ..., steps."""
        return list(range(0, self.steps + 1, self.save_every))


@dataclass(frozen=True)
@_conf_defaults(
    "prune",
)
class PruneConfig:
    """Layer pruning (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
    Layers"): remove the ``layers`` consecutive decoder layers whose input and output hidden
    states at the last prompt token are closest in angular distance, measured with the base
    model on the first ``calibration`` training prompts (stage ``prune@``,
    :mod:`lalora.models.prune`); the fine-tune heals the rest. 0: no pruning (the stage loads
    nothing)."""

    layers: int
    calibration: int

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ConfigError(f"prune.layers must be >= 0 (0: no pruning), got {self.layers}")
        if self.calibration <= 0:
            raise ConfigError(f"prune.calibration must be > 0 prompts, got {self.calibration}")


@dataclass(frozen=True)
@_conf_defaults(
    "ensemble",
)
class EnsembleConfig:
    """The deep ensemble (Lakshminarayanan et al. 2017): ``members`` independent fine-tuning
    runs, the study's own (``finetune.seed``) and ``members - 1`` more with seeds
    ``finetune.seed + 1, ...`` (LoRA initialisation, batch order and dropout); their final MAP
    predictions are averaged. 1: no extra run (the ensemble is the MAP itself, not reported)."""

    members: int

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError(f"ensemble.members must be >= 1, got {self.members}")

    def seeds(self, finetune: FinetuneConfig) -> list[int]:
        """The fine-tuning seeds of the extra members (not the study's own run)."""
        return [finetune.seed + k for k in range(1, self.members)]
