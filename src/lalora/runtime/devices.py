"""The one device a stage computes on, chosen once from ``launch.device``, and where the LoRA
statistics are kept.

``auto`` is ``cuda:LOCAL_RANK`` where CUDA is present (each ``torchrun`` process its own GPU),
else the CPU. The model is placed there when it is loaded
(:func:`lalora.models.zoo.load_base_model`), every batch when it is encoded
(:func:`lalora.models.classifier.encode`); the Kronecker accumulators, the projection bases and the
dropout generators follow the tensors they are given. The float64 statistics live on the compute
device where it has float64 (CPU, CUDA), else in host memory (:func:`statistics_device`): each
batch's float32 product is then added into the host buffer. Per-batch results (logits, covariances,
projections) come back to the host, where the prior tuning and the predictive read them.
"""

from __future__ import annotations

import os

import torch

from lalora.config import DEVICE_SPEC
from lalora.core.errors import UserError


class DeviceError(UserError, RuntimeError):
    """``launch.device`` names a device this machine does not have."""


def resolve(spec: str = "auto") -> torch.device:
    """The device of ``spec`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) for this process:
    ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` under torchrun (``cuda:0`` otherwise)."""
    if not DEVICE_SPEC.match(spec):
        raise DeviceError(f"launch.device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"launch.device is {spec}, and this machine has no CUDA GPU: use auto")
    index = int(spec.split(":")[1]) if ":" in spec else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"launch.device {spec}: GPU {index} does not exist ({torch.cuda.device_count()} "
            "visible; check CUDA_VISIBLE_DEVICES and launch.nproc_per_node)"
        )
    return torch.device("cuda", index)


def has_float64(device: torch.device) -> bool:
    """Whether ``device`` computes in float64 (the CPU and CUDA do, MPS does not)."""
    return device.type in ("cpu", "cuda")


def statistics_device(device: torch.device) -> torch.device:
    """Where float64 statistics computed from ``device``'s tensors are accumulated."""
    return device if has_float64(device) else torch.device("cpu")


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (all of them, once placed)."""
    return next(model.parameters()).device


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (``getrusage``'s ``ru_maxrss``: KiB on Linux,
    bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_bytes(device: torch.device) -> int | None:
    """The peak memory allocated on a CUDA device since the last reset (None elsewhere)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
