"""How stages start and where they compute."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lalora.config.base import (
    ConfigError,
    _conf_defaults,
)

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # launch.device (lalora.runtime.devices)


@dataclass(frozen=True)
@_conf_defaults(
    "launch",
)
class LaunchConfig:
    """How the heavy stages (finetune, members, fit_kfac, tune_prior, evaluate, shift) start:
    ``nproc_per_node`` 1 runs plain ``python``, N > 1 runs ``torchrun --nproc-per-node N``
    (data parallel, :mod:`lalora.runtime.distributed`) with ``backend`` (``auto``: nccl with CUDA,
    else gloo) and ``threads`` CPU threads per process (0: torch's default, 1 per process
    under torchrun). ``memory_gb``: the memory the factor fit and the predictive may use
    (0: what the machine has available; :mod:`lalora.models.memory` refuses a setting estimated to
    need more; on CUDA also one above the GPU's free memory). ``device``: where the model
    computes (``auto``: ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``; or ``cpu``, ``cuda``,
    ``cuda:N``; :mod:`lalora.runtime.devices`). ``warm_start``: a 1-process stage runs in a fork of
    a server that has imported its libraries once (:mod:`lalora.scale.warm`). The stages do not
    declare these keys: results equal the 1-process CPU run's (to round-off), so changing them
    reruns nothing."""

    nproc_per_node: int
    backend: Literal["auto", "gloo", "nccl"]
    threads: int
    memory_gb: float
    device: str
    warm_start: bool

    def __post_init__(self) -> None:
        if not DEVICE_SPEC.match(self.device):
            raise ConfigError(f"launch.device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda:") and self.nproc_per_node > 1:
            raise ConfigError(
                f"launch.device {self.device} names one GPU for {self.nproc_per_node} processes: "
                "use cuda or auto (each process takes the GPU of its LOCAL_RANK)"
            )
        if self.memory_gb < 0:
            raise ConfigError(f"launch.memory_gb must be >= 0 (0: what the machine has), got "
                              f"{self.memory_gb}")  # fmt: skip
        if self.nproc_per_node < 1 or self.threads < 0:
            raise ConfigError(
                f"launch: need nproc_per_node >= 1 and threads >= 0, got "
                f"{self.nproc_per_node} and {self.threads}"
            )
