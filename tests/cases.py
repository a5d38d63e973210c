"""Tiny float64 models with LoRA and dense torch.func references for the Laplace tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lalora.models.adapters import lora_modules
from lalora.models.classifier import Batch, answer_logits


def report_close(actual: Tensor, expected: Tensor, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    """assert_close that says where and by how much the values differ."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    if not bool((diff <= tol).all()):
        idx = tuple(int(i) for i in torch.nonzero(diff > tol)[0])
        raise AssertionError(
            f"max abs diff {float(diff.max()):.3e} "
            f"(max |expected| {float(expected.abs().max()):.3e});"
            f" first bad index {idx}: {float(actual[idx]):.6e} vs {float(expected[idx]):.6e}"
        )


class MLP(nn.Module):
    """Two linear layers on (B, d_in) inputs -> (B, C)."""

    def __init__(self, d_in: int = 5, hidden: int = 6, C: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@dataclass(frozen=True)
class XBatch:
    x: Tensor
    labels: Tensor
    attention_mask: None = None


def with_lora(model: nn.Module, targets: list[str], r: int = 2, seed: int = 0) -> nn.Module:
    """PEFT LoRA (no dropout) with random, non-zero A and B, in float64."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
    )
    pm = pm.double()
    with torch.no_grad():
        for m in lora_modules(pm).values():
            m.weight.normal_(0, 0.5)
    pm.eval()
    return pm


def mlp_case(C: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return with_lora(MLP(C=C), ["fc1", "fc2"], seed=seed)


def mlp_logits(model: nn.Module, batch: XBatch) -> Tensor:
    return model(batch.x)


def llama_case(seed: int = 0, lm_head: bool = True) -> nn.Module:
    """Tiny random LLaMA (vocab 32, hidden 16, 2 layers) with LoRA on q/v (and lm_head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = AutoModelForCausalLM.from_config(cfg).double()
    base.requires_grad_(False)
    for module in base.modules():  # HF's RMSNorm computes in float32; keep float64 exact
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = _rms_norm_float64(module)
    targets = ["q_proj", "v_proj", *(["lm_head"] if lm_head else [])]
    return with_lora(base, targets, seed=seed)


def _rms_norm_float64(norm: nn.Module):
    def forward(x: Tensor) -> Tensor:
        return (
            norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        )

    return forward


def llama_batch(
    lengths: list[int], C: int = 2, seed: int = 0, padding_side: str = "right"
) -> Batch:
    """Random token sequences of the given lengths, padded with token 0."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq = torch.randint(1, 32, (n,), generator=gen)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = seq
        mask[i, sl] = 1
    labels = torch.randint(0, C, (len(lengths),), generator=gen)
    return Batch(ids, mask, labels)


def answer_ids(C: int) -> list[int]:
    return [3, 7, 11, 19][:C]


def llama_logits_fn(C: int):
    return lambda model, batch: answer_logits(model, batch, answer_ids(C))


def dense_jacobian(model: nn.Module, batch, logits_fn, names: list[str]) -> Tensor:
    """J (N, C, P) of the logits w.r.t. the named LoRA weights (row-major per module, in order)."""
    from torch.func import jacrev

    mods = lora_modules(model)
    params = {f"{n}.weight": mods[n].weight.detach() for n in names}

    jac = jacrev(lambda p: _call(model, p, batch, logits_fn))(params)  # dict of (N, C, out, in)
    return torch.cat([jac[f"{n}.weight"].flatten(2) for n in names], dim=2)


def _call(model: nn.Module, params: dict[str, Tensor], batch, logits_fn) -> Tensor:
    from torch.func import functional_call

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self):
            return logits_fn(self.inner, batch)

    w = Wrapped()
    return functional_call(w, {f"inner.{k}": v for k, v in params.items()}, (), strict=False)


def dense_ggn(J: Tensor, logits: Tensor) -> Tensor:
    """sum_n J_n^T (diag p_n - p_n p_n^T) J_n, (P, P)."""
    p = torch.softmax(logits.double(), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
