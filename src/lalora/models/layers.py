"""Removing decoder layers from a base model: the layer list of a decoder, the config and the
model without a block of layers (the mechanics :mod:`lalora.models.prune` chooses the block for)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from lalora.config import ConfigError
from lalora.core.errors import ModelError

if TYPE_CHECKING:  # torch is imported where a model is
    from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.model.layers`` for Llama, Phi and Phi-3)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(base).__name__}: no decoder layer list to prune")
    return layers


def pruned_config(config, drop: tuple[int, ...]):
    """A copy of a transformers config with the layers ``drop`` removed: fewer
    ``num_hidden_layers`` and, where the config lists per-layer types, those of the rest."""
    config = copy.deepcopy(config)
    if not drop:
        return config
    L = config.num_hidden_layers
    if drop[-1] >= L:
        raise ConfigError(f"cannot remove layers {list(drop)} of a model of {L} layers")
    config.num_hidden_layers = L - len(drop)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    return config


def drop_layers(model: nn.Module, drop: tuple[int, ...]) -> nn.Module:
    """Remove the decoder layers ``drop`` from a transformers causal LM, in place: the rest are
    renumbered 0 .. L-n-1 (their attention's ``layer_idx``, which indexes the key-value cache)
    and the config says L-n layers, as a model built with that config would. Returns it."""
    if not drop:
        return model
    from torch import nn

    layers = decoder_layers(model)
    config = pruned_config(model.config, drop)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    for i, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    model.get_decoder().layers = nn.ModuleList(kept)
    for target in {id(model.config): model.config, id(model.get_decoder().config):
                   model.get_decoder().config}.values():  # fmt: skip
        target.num_hidden_layers = config.num_hidden_layers
        if hasattr(config, "layer_types"):
            target.layer_types = config.layer_types
    return model
