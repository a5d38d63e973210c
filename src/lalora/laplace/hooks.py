"""Capture the inputs and output gradients of LoRA linear maps.

Layout used throughout ``lalora.laplace``: a module with weight (d_out, d_in) sees inputs ``a`` of
shape (B, T, d_in) (or (B, d_in), read as T = 1) and output gradients ``g`` of shape (B, T, d_out).
Padding positions (``mask == 0``) are zeroed in both, so they contribute nothing to any sum.
Modules that read the very same input tensor in one forward pass (the ``q_proj`` and ``v_proj``
LoRA-A maps of a layer both read its normalised hidden states) are reported as sharing it, so
their input statistics are accumulated once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class Tap:
    """Records, per module name, the masked input (B, T, d_in) of the current forward pass and
    calls ``on_grad(name, a, g)`` with the masked output gradient (B, T, d_out) on each backward.
    ``on_input(name, a, source)`` is called on each forward, ``source`` being the first module
    that read the same input tensor in this forward pass (``name`` itself if none did). Set
    ``mask`` before each forward pass: it starts a new pass. ``mask_grads=False`` leaves the
    gradients unmasked, for callers that only form products g_t a_t^T (zero where a_t is);
    ``mask_inputs=False`` leaves the inputs unmasked (the activations at padding positions, which
    the paper's code counts in its input factor).
    """

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        on_grad: Callable[[str, Tensor, Tensor], None],
        on_input: Callable[[str, Tensor, str], None] | None = None,
        mask_grads: bool = True,
        mask_inputs: bool = True,
    ):
        self.modules = modules
        self.on_grad = on_grad
        self.on_input = on_input
        self.mask_grads = mask_grads
        self.mask_inputs = mask_inputs
        self.inputs: dict[str, Tensor] = {}
        # the module outputs of this pass that carry gradients (backpropagating to these
        # instead of the weights skips the weight gradients, which nobody reads)
        self.outputs: list[Tensor] = []
        self._mask: Tensor | None = None
        # input tensors seen in this pass (kept alive, so no address is reused within it)
        self._seen: dict[tuple, tuple[str, Tensor]] = {}
        self._handles: list = []

    @property
    def mask(self) -> Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: Tensor | None) -> None:
        self._mask = mask
        self._seen.clear()
        self.outputs.clear()

    def _expand(self, x: Tensor, masked: bool = True) -> Tensor:
        x = x.detach()
        if x.ndim == 2:
            return x[:, None, :]  # (B, 1, d)
        if x.ndim != 3:
            raise ValueError(f"LoRA module input must be (B, d) or (B, T, d), got {tuple(x.shape)}")
        if masked and self.mask is not None:
            if self.mask.shape != x.shape[:2]:
                raise ValueError(
                    f"mask {tuple(self.mask.shape)} does not match input {tuple(x.shape)}"
                )
            x = x * self.mask[:, :, None].to(x.dtype)
        return x

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
            source = self._seen.setdefault(key, (name, x))[0]
            if source == name:
                self.inputs[name] = self._expand(x, self.mask_inputs)
            else:
                self.inputs[name] = self.inputs[source]
            if self.on_input is not None:
                self.on_input(name, self.inputs[name], source)
            if output.requires_grad:
                self.outputs.append(output)
                output.register_hook(
                    lambda g: self.on_grad(
                        name, self.inputs[name], self._expand(g, self.mask_grads)
                    )
                )

        return hook

    def __enter__(self) -> Tap:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.inputs.clear()
        self.outputs.clear()


@contextmanager
def lora_grad_enabled(modules: dict[str, nn.Linear]) -> Iterator[list[Tensor]]:
    """Temporarily make the LoRA weights require grad (so their outputs get gradients)."""
    params = [m.weight for m in modules.values()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, b in zip(params, before, strict=True):
            p.requires_grad_(b)


def output_gradients(logits: Tensor, vectors: Tensor, targets: list[Tensor]) -> None:
    """Backpropagate each column of ``vectors`` (B, C, K) as an output gradient of ``logits``
    (B, C) down to ``targets`` (the tap's module outputs, :attr:`Tap.outputs`): K backward
    passes through one graph, firing the tap's gradient hooks each time. Stopping at the
    outputs skips the weight gradients, which nothing reads.
    """
    K = vectors.shape[-1]
    for k in range(K):
        torch.autograd.grad(
            logits,
            targets,
            grad_outputs=vectors[:, :, k].to(logits.dtype),
            retain_graph=k < K - 1,
            allow_unused=True,
        )
