"""LoRA on a base model: the card's target modules, attaching fresh adapters (PEFT), reading
exported adapter folders back (checked first), and the LoRA linear maps the Laplace library
works on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lalora.config import ModelCard
from lalora.core.errors import ArtifactError, ModelError


def lora_targets(card: ModelCard) -> list[str]:
    """Module names that get LoRA adapters: the card's targets, plus ``lm_head`` if adapted."""
    return [*card.targets, *(["lm_head"] if card.lm_head else [])]


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear maps (``q_proj``, ``lm_head``,
    ...): what a LoRA target may name."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Conv1D")


def check_targets(model: nn.Module, card: ModelCard) -> None:
    """Every LoRA target of the card must name at least one linear map of the model (PEFT only
    complains when none of them matches anything)."""
    names = [n for n, m in model.named_modules() if _is_linear(m)]
    missing = [
        t for t in lora_targets(card) if not any(n == t or n.endswith("." + t) for n in names)
    ]
    if missing:
        raise ModelError(
            f"LoRA target(s) {missing} match no linear module of this "
            f"{type(model).__name__}; its linear modules are {linear_module_names(model)}"
        )


def attach_lora(model: nn.Module, card: ModelCard, seed: int = 0):
    """Wrap ``model`` with fresh PEFT LoRA adapters (seeded init: A Kaiming, B zero)."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, card)

    config = LoraConfig(
        r=card.r,
        lora_alpha=card.alpha,
        lora_dropout=card.dropout,
        target_modules=lora_targets(card),
        bias="none",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def check_adapter(adapter_dir: Path, stage: str = "export", finite: bool = False) -> None:
    """A PEFT adapter folder must hold a json ``adapter_config.json`` and a complete
    ``adapter_model.safetensors`` (with ``finite``: every weight finite, which reads them all);
    else an ArtifactError naming the file and ``stage``."""
    from safetensors import safe_open

    from lalora.core.io import check_safetensors, read_json

    adapter_dir = Path(adapter_dir)
    if not isinstance(read_json(adapter_dir / "adapter_config.json", stage), dict):
        raise ArtifactError(adapter_dir / "adapter_config.json", "not a json object", stage)
    weights = adapter_dir / "adapter_model.safetensors"
    names = check_safetensors(weights, stage)
    if finite:
        with safe_open(str(weights), "pt") as f:
            for name in names:
                if not torch.isfinite(f.get_tensor(name)).all():
                    raise ArtifactError(weights, f"non-finite values in {name}", stage)


def load_adapter(model: nn.Module, adapter_dir: Path, trainable: bool = False):
    """Load a standard PEFT adapter folder onto a base model (checked first)."""
    from peft import PeftModel

    check_adapter(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def lora_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The LoRA factor maps of a PEFT model, by name: every ``lora_A``/``lora_B`` Linear."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name):
            out[name] = module
    if not out:
        raise ModelError("the model has no LoRA modules (lora_A / lora_B)")
    return out


def adapter_lora_weights(adapter_dir: Path, names: list[str]) -> dict[str, Tensor]:
    """The weights of a saved PEFT adapter for the LoRA modules ``names`` (as named by
    :func:`lora_modules`, e.g. ``...q_proj.lora_A.default``), read from its safetensors file."""
    from safetensors.torch import load_file

    from lalora.core.io import check_safetensors

    path = Path(adapter_dir) / "adapter_model.safetensors"
    check_safetensors(path, "export")
    saved = load_file(str(path))
    out = {}
    for name in names:
        key = name.rsplit(".", 1)[0] + ".weight"  # drop the adapter name ("default")
        if key not in saved:
            raise ArtifactError(path, f"no weight {key!r} for LoRA module {name}", "export")
        out[name] = saved[key]
    return out
