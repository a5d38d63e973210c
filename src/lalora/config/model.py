"""The model zoo's cards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lalora.config.base import (
    ConfigError,
    check_plain_name,
)


@dataclass(frozen=True)
class ModelCard:
    """One entry of the model ``zoo``.

    ``source`` is ``hub`` (a HuggingFace repo id in ``repo``), ``gguf`` (a GGUF file shipped by the
    Python package ``package``, loaded offline and dequantised) or ``tiny`` (a random model of
    architecture ``arch`` built from a small config, for tests and smoke runs).
    """

    source: Literal["hub", "gguf", "tiny"]
    repo: str = ""
    package: str = ""
    gguf_file: str = ""
    arch: Literal["llama", "phi", "phi3", ""] = ""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lm_head: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    quantization: Literal["none", "nf4"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    params_billion: float = 0.0
    # decoder layers removed before LoRA is attached (0-based, consecutive): set by the stages
    # from the prune stage's choice (:func:`lalora.models.prune.pruned`), not written in the zoo
    drop: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.source == "hub" and not self.repo:
            raise ConfigError("a hub model card needs 'repo'")
        if self.source == "gguf" and not (self.package and self.gguf_file):
            raise ConfigError("a gguf model card needs 'package' and 'gguf_file'")
        if self.source == "tiny" and not self.arch:
            raise ConfigError("a tiny model card needs 'arch' (llama, phi or phi3)")
        if self.r <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"LoRA r must be > 0 and dropout in [0, 1), got {self.r}, {self.dropout}"
            )
        if not self.alpha > 0:
            raise ConfigError(f"alpha: the LoRA scale alpha must be > 0, got {self.alpha}")
        if self.params_billion < 0:
            raise ConfigError(f"params_billion must be >= 0, got {self.params_billion}")
        if not self.targets:
            raise ConfigError("'targets' must name at least one module")
        for i, target in enumerate(self.targets):
            check_plain_name(f"targets[{i}]", target)
        if any(k < 0 for k in self.drop) or list(self.drop) != list(
            range(self.drop[0], self.drop[0] + len(self.drop)) if self.drop else []
        ):
            raise ConfigError(f"drop: expected consecutive layer indices >= 0, got {self.drop}")
