"""Layer pruning before Laplace-LoRA (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
the Deeper Layers").

With the base model on calibration prompts, let ``h_l`` (H,) be the residual stream at the last
prompt token entering decoder layer l (l = 0 .. L-1; ``h_L``: leaving the last layer, before
the final norm: :func:`last_token_states`). For a block of n layers, the angular
distance

    d(l, n) = mean over prompts of arccos(<h_l, h_{l+n}> / (|h_l| |h_{l+n}|)) / pi,

l = 0 .. L-n, is in [0, 1]; the block l* = argmin_l d(l, n) changes the representation least and
layers l* .. l*+n-1 are removed. Every later stage builds the model without them
(:func:`drop_layers`, through the card's ``drop``: :func:`pruned`), so the LoRA fine-tune heals
the pruned model and the Laplace posterior is over the LoRA weights of the layers that remain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lalora.config import ConfigError, ModelCard, Params
from lalora.core.errors import ArtifactError
from lalora.core.io import atomic_write_json, save_figure
from lalora.models.layers import decoder_layers

if TYPE_CHECKING:  # torch is imported where a model is: the choice alone (prune.json) needs none
    from torch import Tensor, nn

    from lalora.models.classifier import Batch

# what prune.json means; a file of another version is refused
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Choice:
    """The prune stage's result: remove ``layers`` decoder layers from ``start`` of the
    model's ``num_layers`` (``layers`` 0: none, ``start`` -1). ``distances``: d(l, n) for
    l = 0 .. num_layers - layers, averaged over ``prompts`` calibration prompts (empty when
    nothing is pruned)."""

    layers: int
    start: int
    num_layers: int
    prompts: int
    distances: tuple[float, ...]

    @property
    def removed(self) -> tuple[int, ...]:
        """The removed layers' indices (0-based, in the unpruned model)."""
        return tuple(range(self.start, self.start + self.layers)) if self.layers else ()

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self), "removed": list(self.removed)}


NOTHING = Choice(layers=0, start=-1, num_layers=0, prompts=0, distances=())


def last_token_states(model: nn.Module, batches: list[Batch]) -> Tensor:
    """The residual stream at each prompt's last token, (L+1, N, H) in float64: entry l < L
    enters decoder layer l (transformers' ``output_hidden_states[l]``), entry L leaves the last
    layer, before the final norm (transformers' last hidden state has the norm applied, which
    rescales each feature and so changes angles). The positions are those the classifier uses
    (:func:`lalora.models.classifier.answer_logits`)."""
    import torch

    from lalora.models.classifier import last_positions

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    captured: list[Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    hook = decoder_layers(base)[-1].register_forward_hook(keep)
    out = []
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.attention_mask
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
                states = base.get_decoder()(
                    input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids,
                    output_hidden_states=True,
                ).hidden_states  # L+1 of (B, T, H); the last normed  # fmt: skip
                rows = torch.arange(mask.shape[0], device=mask.device)
                last = last_positions(mask)
                stream = [*states[:-1], captured.pop()]
                out.append(torch.stack([h[rows, last] for h in stream]).double().cpu())
    finally:
        hook.remove()
    return torch.cat(out, dim=1)


def angular_distances(states: Tensor, n: int) -> Tensor:
    """d(l, n) for l = 0 .. L-n, (L-n+1,): the mean over prompts of the angle between
    ``states[l]`` and ``states[l + n]`` divided by pi. ``states``: (L+1, N, H)."""
    import torch

    L = states.shape[0] - 1
    if not 1 <= n <= L:
        raise ConfigError(f"prune.layers must be in [1, {L}] for a model of {L} layers, got {n}")
    a, b = states[: L - n + 1], states[n:]  # (L-n+1, N, H)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cos.clamp(-1.0, 1.0)).mean(-1) / torch.pi


def choose(states: Tensor, n: int) -> Choice:
    """The block of ``n`` layers to remove: the first minimiser of :func:`angular_distances`."""
    import torch

    d = angular_distances(states, n)
    return Choice(
        layers=n, start=int(torch.argmin(d)), num_layers=states.shape[0] - 1,
        prompts=states.shape[1], distances=tuple(float(x) for x in d),
    )  # fmt: skip


def measure(params: Params, model_name: str, train_path: Path) -> Choice:
    """The prune stage: with ``prune.layers`` n > 0, load ``model_name``'s base model on
    ``launch.device``, take the last-token hidden states of the first ``prune.calibration``
    prompts of the prepared split ``train_path`` (batches of ``evaluate.batch_size``, at most
    ``finetune.max_length`` tokens) and choose the block (:func:`choose`). n = 0: nothing is
    loaded."""
    n = params.prune.layers
    if n == 0:
        return NOTHING
    from lalora.data.files import DataError, read_split
    from lalora.models.pipeline import batches
    from lalora.models.zoo import load_base_model, load_tokenizer
    from lalora.runtime.devices import resolve

    split = read_split(train_path)
    examples = list(split.examples[: params.prune.calibration])
    if not examples:
        raise DataError(f"{train_path}: no training prompts to measure the layers on")
    card = params.card(model_name)
    tok = load_tokenizer(card)
    model = load_base_model(card, len(tok), device=resolve(params.launch.device))
    model.eval()
    L = model.config.num_hidden_layers
    if n >= L:
        raise ConfigError(f"prune.layers {n}: {model_name} has {L} layers; at most {L - 1} go")
    device = next(model.parameters()).device
    data = list(batches(tok, examples, params.evaluate.batch_size, params.finetune.max_length,
                        device))  # fmt: skip
    return choose(last_token_states(model, data), n)


def write(choice: Choice, path: Path) -> None:
    atomic_write_json(path, choice.to_json())


def read(path: Path) -> Choice:
    """The prune stage's choice from its ``prune.json``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(path, f"cannot read the layers to remove ({err})", "prune") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise ArtifactError(path, f"format_version {found!r}, expected {FORMAT_VERSION}", "prune")
    return Choice(
        layers=int(raw["layers"]), start=int(raw["start"]), num_layers=int(raw["num_layers"]),
        prompts=int(raw["prompts"]), distances=tuple(float(x) for x in raw["distances"]),
    )  # fmt: skip


def pruned(params: Params, model_name: str, path: Path | None) -> Params:
    """``params`` with ``model_name``'s card removing the layers the prune stage chose
    (``path``: its ``prune.json``; None: unpruned). Every stage after ``prune`` loads its model
    through this card (:func:`lalora.models.zoo.load_base_model`)."""
    if path is None:
        return params
    choice = read(path)
    if choice.layers != params.prune.layers:
        raise ArtifactError(
            path, f"it removes {choice.layers} layers and prune.layers is {params.prune.layers}",
            "prune",
        )  # fmt: skip
    card: ModelCard = replace(params.card(model_name), drop=choice.removed)
    return replace(params, zoo={**params.zoo, model_name: card})


def plot(choice: Choice, path: Path, title: str) -> None:
    """The distance curve d(l, n) against l, the chosen block marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if choice.layers:
        ax.plot(range(len(choice.distances)), choice.distances, marker="o", ms=3)
        last = choice.start + choice.layers - 1
        ax.axvline(choice.start, color="C3", ls="--", lw=1,
                   label=f"removed: layers {choice.start}-{last}")  # fmt: skip
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "prune.layers 0: no layer removed", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set(xlabel="first layer l of the block", ylabel=f"angular distance d(l, {choice.layers})",
           title=title)  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)
