"""Typed, validated params sections.

Every section of ``params.yaml`` loads into a frozen dataclass through :func:`load_section`. An
unknown key, a value of the wrong type, an out-of-range value or an unknown model/dataset name
stops with a :class:`ConfigError` that names the offending key, in the spirit of nanoGPT's
configurator (an override must keep its default's type).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lalora.errors import UserError
from lalora.paths import resolve_dir

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A params section is malformed: the message names the key and the problem."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unions are not supported in params")
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            value = float(value)  # 1e-4: a float in YAML 1.2 (DVC), a string to PyYAML
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type[T], raw: Any, key: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{key}.{k}" if key else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{key or 'params'}: {err}") from None
    except ConfigError as err:
        raise ConfigError(
            f"{key}: {err}" if key and not str(err).startswith(key) else str(err)
        ) from None


# The project's configuration: conf/config.yaml and its groups' default options, composed by
# DVC (Hydra) into params.yaml. It is the one place a default is written: the section
# dataclasses below take their defaults from it (:func:`_conf_defaults`).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _merge(into: dict, new: dict) -> dict:
    """``new`` merged into ``into`` as Hydra merges configs: mappings key by key, the rest
    replaced."""
    out = dict(into)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_conf(conf_dir: Path = CONF_DIR) -> dict:
    """``conf/`` composed with each group's default option, as Hydra composes it without
    overrides (tested against :func:`compose`), read with PyYAML alone so the library needs no
    Hydra: the defaults list in order (a group option merged at the top level when it says
    ``# @package _global_``, else under the group's name), ``_self_`` where it is listed."""
    raw = yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}
    own = {k: v for k, v in raw.items() if k != "defaults"}
    out: dict = {}
    for item in raw.get("defaults", ["_self_"]):
        if item == "_self_":
            out = _merge(out, own)
            continue
        ((group, option),) = item.items()
        path = conf_dir / group / f"{option}.yaml"
        text = path.read_text()
        sub = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "defaults"}
        out = _merge(out, sub if "@package _global_" in text.split("\n", 1)[0] else {group: sub})
    return out


@functools.cache
def _conf_at_import() -> dict:
    """``conf/`` as read once, when the section dataclasses are defined (they only read it)."""
    return read_conf()


def _conf_defaults(*section: str):
    """Give a section dataclass (applied before ``@dataclass``) the defaults of ``conf/``'s
    ``section`` (e.g. ``("finetune",)``, ``("data", "generated")``), typed by its annotations.
    A field the section does not list keeps its default in code; one that both give is an
    error, so each default is written once. Without ``conf/`` (the package alone) the fields
    it would give are required."""

    def apply(cls):
        if not CONF_DIR.is_dir():
            return cls
        values = _conf_at_import()
        for key in section:
            values = values[key]
        hints = typing.get_type_hints(cls)
        for name in cls.__annotations__:
            if name not in values:
                continue
            if name in vars(cls):
                raise TypeError(f"{cls.__name__}.{name}: a default in code and in conf/")
            setattr(cls, name, _coerce(values[name], hints[name], ".".join((*section, name))))
        return cls

    return apply


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# numbers that YAML 1.2 (DVC's ruamel) reads as floats and PyYAML's YAML 1.1 rule as strings
_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# names that cannot be models: predictions/<name>/ is another stage's folder
RESERVED = ("members", "shift")
# names that cannot be datasets: data/<name>/ is another stage's folder
RESERVED_DATA = ("sources",)


def check_plain_name(key: str, value: str) -> None:
    """``value`` names a file or folder component: letters, digits, ``_.+-``, not starting
    with a dot or dash, no path separator, no ``..`` (so no output escapes its folder)."""
    if not _PLAIN.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"{key}: {value!r} is not a plain name (letters, digits and _ . + -, starting with "
            "a letter or digit, no '/' or '..')"
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
    # from the prune stage's choice (:func:`lalora.prune.pruned`), not written in the zoo
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


@dataclass(frozen=True)
class SchemaConfig:
    """The fields of a custom multiple-choice dataset (``name: custom``): one record per
    question, with ``id`` (optional; else the file and line), ``question`` (a non-empty
    string), ``choices`` (one field holding the list of choice texts, or one field per choice)
    and ``answer`` (the true choice: a 0-based index, a letter ``A``, ``B``, ..., or the text of
    a choice). Every record has ``n_choices`` choices (2 to 26); the answers are the tokens
    " A", " B", ... . ``template``: the prompt, with ``{question}`` and ``{choices}`` (rendered
    "A. ... B. ..."); empty: the ARC prompt. ``hub_id`` (and ``hub_config``): the HuggingFace
    dataset read with ``source: hub``; its split names are ``train_split`` and
    ``test_split``."""

    n_choices: int = 0
    id: str = "id"
    question: str = "question"
    choices: tuple[str, ...] = ("choices",)
    answer: str = "answer"
    template: str = ""
    hub_id: str = ""
    hub_config: str = ""

    def __post_init__(self) -> None:
        if self.n_choices and not 2 <= self.n_choices <= 26:
            raise ConfigError(f"schema.n_choices must be 2 to 26, got {self.n_choices}")
        if len(self.choices) not in (1, self.n_choices or 1) or not all(self.choices):
            raise ConfigError(
                f"schema.choices {list(self.choices)}: one field holding the list of choices, "
                f"or one field per choice ({self.n_choices})"
            )
        if self.template:
            fields = set(re.findall(r"{([^{}]*)}", self.template))
            if fields != {"question", "choices"}:
                raise ConfigError(
                    f"schema.template must contain {{question}} and {{choices}} and no other "
                    f"field, got {sorted(fields)}: {self.template!r}"
                )


@dataclass(frozen=True)
@_conf_defaults("data", "generated")
class DataConfig:
    """The task: ``name`` is a key of :data:`lalora.data.DATASETS` (generated, winogrande,
    arc_c, arc_e, obqa, boolq, or custom: the user's own files or hub dataset, read as
    ``schema`` says, :class:`SchemaConfig`). For read datasets ``n_train``/``n_test`` examples
    are used (a seeded subset in file order when fewer than the split holds).

    ``source`` is ``generated`` (the project's own task), ``hub`` (HuggingFace ``datasets``) or
    ``local`` (a folder of the official files, ``local_dir``, relative to the project root,
    :func:`lalora.paths.resolve_dir`). ``val_size`` examples are carved from train (seeded) for
    prior tuning on validation NLL.

    Training on the test split is refused (``train_split == test_split``). Where one split is all
    there is (BoolQ's local ``dev``), ``split_from: dev`` draws train (``n_train``) and test
    (``n_test``) as a seeded, disjoint partition of it: a split of our own, not the benchmark's
    official protocol (``train_split`` and ``test_split`` are then not read).
    """

    name: str
    source: Literal["generated", "hub", "local"]
    local_dir: str
    train_split: str
    test_split: str
    n_train: int
    n_test: int
    val_size: int
    seed: int
    split_from: str
    schema: SchemaConfig = field(default_factory=SchemaConfig)

    def __post_init__(self) -> None:
        for key in ("name", "train_split", "test_split"):
            check_plain_name(key, getattr(self, key))
        if (self.name == "custom") != bool(self.schema.n_choices):
            raise ConfigError(
                "a custom dataset (name: custom) needs schema.n_choices >= 2, and only a custom "
                f"dataset has a schema (name {self.name!r}, schema.n_choices "
                f"{self.schema.n_choices})"
            )
        if self.name == "custom" and self.source == "generated":
            raise ConfigError("name custom reads files (source: local) or the hub (source: hub)")
        if self.name == "custom" and self.source == "hub" and not self.schema.hub_id:
            raise ConfigError("schema.hub_id: a custom dataset from the hub needs its id")
        if self.split_from:
            check_plain_name("split_from", self.split_from)
            if self.source == "generated":
                raise ConfigError("split_from: the generated task has no splits to divide")
        elif self.source != "generated" and self.train_split == self.test_split:
            raise ConfigError(
                f"train_split and test_split are both {self.train_split!r}: that trains on the "
                f"test prompts. Name two splits, or set split_from: {self.train_split} for a "
                "seeded, disjoint split of it into n_train and n_test examples (not the "
                "official protocol)"
            )
        if self.source == "local" and not self.local_dir:
            raise ConfigError("local_dir: source 'local' needs the folder of the data files")
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(
                f"n_train and n_test must be >= 1, got {self.n_train} and {self.n_test}"
            )
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}")
        if self.source == "generated" and self.val_size >= self.n_train:
            raise ConfigError(
                f"val_size ({self.val_size}) must be smaller than n_train ({self.n_train}): "
                "the validation split is carved from the training items"
            )


@dataclass(frozen=True)
@_conf_defaults(
    "finetune",
)
class FinetuneConfig:
    """LoRA fine-tuning (the report's Table 1): AdamW, linear schedule, checkpoints.
    ``lora_plus_ratio``: LoRA+ (Hayou, Ghosh and Yu 2024), the B maps train at
    ``lora_plus_ratio * lr``, the A maps (and any other trainable weight) at ``lr``; 1 is plain
    LoRA, one parameter group."""

    lr: float
    weight_decay: float
    batch_size: int
    max_length: int
    steps: int
    save_every: int
    warmup_steps: int
    seed: int
    lora_plus_ratio: float

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.save_every <= 0 or self.steps % self.save_every:
            raise ConfigError(
                f"finetune.steps ({self.steps}) must be a positive multiple of "
                f"finetune.save_every ({self.save_every})"
            )
        if self.batch_size <= 0 or self.lr <= 0 or self.max_length <= 0:
            raise ConfigError(
                f"finetune.batch_size, lr and max_length must be positive, got "
                f"{self.batch_size}, {self.lr} and {self.max_length}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.lora_plus_ratio > 0:
            raise ConfigError(
                f"finetune.lora_plus_ratio must be > 0 (1: plain LoRA), got {self.lora_plus_ratio}"
            )
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"finetune.warmup_steps must be in [0, steps = {self.steps}], "
                f"got {self.warmup_steps}"
            )

    @property
    def checkpoints(self) -> list[int]:
        """Steps at which a checkpoint is written: 0, save_every, ..., steps."""
        return list(range(0, self.steps + 1, self.save_every))


@dataclass(frozen=True)
@_conf_defaults(
    "evaluate",
)
class EvaluateConfig:
    """MAP and Laplace evaluation, and the comparison's other methods.

    ``methods`` beyond MAP and the configured Laplace posterior: ``la`` (marginal-likelihood
    prior), ``la_val`` (validation-NLL prior), ``llla`` (the ``lm_head`` LoRA only),
    ``temperature`` (temperature scaling on the validation split), ``mc_dropout``
    (``mc_samples`` passes with the LoRA dropout on). ``ensemble_last``: the checkpoint
    ensemble averages the MAP of the last K checkpoints (all of them when fewer; 0: none).
    ``bootstrap``: resamples for the 95% intervals of the comparison table."""

    batch_size: int
    ece_bins: int
    methods: tuple[Literal["la", "la_val", "llla", "temperature", "mc_dropout"], ...]
    mc_samples: int
    ensemble_last: int
    bootstrap: int

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.ece_bins <= 0:
            raise ConfigError("evaluate.batch_size and evaluate.ece_bins must be positive")
        if self.mc_samples < 1 or self.ensemble_last < 0 or self.bootstrap < 10:
            raise ConfigError(
                "evaluate: need mc_samples >= 1, ensemble_last >= 0 and bootstrap >= 10"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"evaluate.methods repeats a method: {list(self.methods)}")


DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # launch.device (lalora.devices)


@dataclass(frozen=True)
@_conf_defaults(
    "launch",
)
class LaunchConfig:
    """How the heavy stages (finetune, members, fit_kfac, tune_prior, evaluate, shift) start:
    ``nproc_per_node`` 1 runs plain ``python``, N > 1 runs ``torchrun --nproc-per-node N``
    (data parallel, :mod:`lalora.distributed`) with ``backend`` (``auto``: nccl with CUDA,
    else gloo) and ``threads`` CPU threads per process (0: torch's default, 1 per process
    under torchrun). ``memory_gb``: the memory the factor fit and the predictive may use
    (0: what the machine has available; :mod:`lalora.memory` refuses a setting estimated to
    need more; on CUDA also one above the GPU's free memory). ``device``: where the model
    computes (``auto``: ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``; or ``cpu``, ``cuda``,
    ``cuda:N``; :mod:`lalora.devices`). ``warm_start``: a 1-process stage runs in a fork of a
    server that has imported its libraries once (:mod:`lalora.warm`). The stages do not
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


@dataclass(frozen=True)
@_conf_defaults(
    "prune",
)
class PruneConfig:
    """Layer pruning (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
    Layers"): remove the ``layers`` consecutive decoder layers whose input and output hidden
    states at the last prompt token are closest in angular distance, measured with the base
    model on the first ``calibration`` training prompts (stage ``prune@``, :mod:`lalora.prune`);
    the fine-tune heals the rest. 0: no pruning (the stage loads nothing)."""

    layers: int
    calibration: int

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ConfigError(f"prune.layers must be >= 0 (0: no pruning), got {self.layers}")
        if self.calibration <= 0:
            raise ConfigError(f"prune.calibration must be > 0 prompts, got {self.calibration}")


@dataclass(frozen=True)
@_conf_defaults(
    "ensemble",
)
class EnsembleConfig:
    """The deep ensemble (Lakshminarayanan et al. 2017): ``members`` independent fine-tuning
    runs, the study's own (``finetune.seed``) and ``members - 1`` more with seeds
    ``finetune.seed + 1, ...`` (LoRA initialisation, batch order and dropout); their final MAP
    predictions are averaged. 1: no extra run (the ensemble is the MAP itself, not reported)."""

    members: int

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError(f"ensemble.members must be >= 1, got {self.members}")

    def seeds(self, finetune: FinetuneConfig) -> list[int]:
        """The fine-tuning seeds of the extra members (not the study's own run)."""
        return [finetune.seed + k for k in range(1, self.members)]


@dataclass(frozen=True)
@_conf_defaults(
    "kfac",
)
class KfacConfig:
    """Kronecker factors: Fisher type, low-rank update, rank ``k``; sides up to ``max_dense`` are
    kept dense (exact), larger ones low-rank; ``normalisation``: what divides the input factor
    (``rows``: the non-padding rows; ``sequences``, ``sequences_padded``: the number of
    sequences, the latter with padding rows summed in, as the paper's code has it)."""

    fisher: Literal["exact", "mc", "empirical"]
    update: Literal["svd", "nystrom"]
    rank: int
    max_dense: int
    batch_size: int
    seed: int
    normalisation: Literal["rows", "sequences", "sequences_padded"]

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.max_dense < 0 or self.batch_size <= 0:
            raise ConfigError("kfac.rank and kfac.batch_size must be positive, kfac.max_dense >= 0")


@dataclass(frozen=True)
@_conf_defaults(
    "prior",
)
class PriorConfig:
    """The prior N(mu, 1/lambda): precision tuned by marginal likelihood or validation NLL,
    one for all weights (``scalar``) or one per LoRA module (``layerwise``); centred at zero or
    at the LoRA initialisation (``mean: init``, the step-0 adapter: random A, zero B); the
    marginal likelihood is the ``standard`` Laplace evidence or the linearised model's
    (``evidence: linear``, Antoran et al. 2022: the prior penalises theta* - mu only where the
    data constrain it)."""

    method: Literal["marglik", "val_nll"]
    evidence: Literal["standard", "linear"]
    structure: Literal["scalar", "layerwise"]
    mean: Literal["zero", "init"]
    log10_min: float
    log10_max: float
    grid: int

    def __post_init__(self) -> None:
        if not self.log10_min < self.log10_max or self.grid < 3:
            raise ConfigError("prior: need log10_min < log10_max and grid >= 3")


@dataclass(frozen=True)
@_conf_defaults(
    "predictive",
)
class PredictiveConfig:
    """Linearised predictive: Monte Carlo over the logit Gaussian, or probit."""

    link: Literal["mc", "probit"]
    samples: int
    seed: int

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ConfigError("predictive.samples must be positive")


@dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``. Loaded by :func:`load_params`, every section must be present;
    the sections' defaults are ``conf/``'s (:func:`_conf_defaults`). ``datasets`` names the
    entries of ``data`` that the study runs (each is prepared, fine-tuned on and evaluated on
    its own)."""

    models: tuple[str, ...]
    datasets: tuple[str, ...]
    checkpoints: tuple[int, ...]
    zoo: dict[str, ModelCard] = field(default_factory=dict)
    data: dict[str, DataConfig] = field(default_factory=lambda: {"generated": DataConfig()})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    kfac: KfacConfig = field(default_factory=KfacConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    predictive: PredictiveConfig = field(default_factory=PredictiveConfig)
    # distribution shift: the test sets each training dataset's final checkpoint is also
    # scored on, e.g. {obqa: [arc_c, arc_e]} (the paper's), for the training datasets in
    # ``datasets``; a target outside ``datasets`` has only its test split prepared, by the shift
    # stage
    shift: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_names()
        self._check_shift()
        self._check_methods()
        self._check_processes()
        if list(self.checkpoints) != self.finetune.checkpoints:
            raise ConfigError(
                f"checkpoints {list(self.checkpoints)} must equal "
                f"{self.finetune.checkpoints} (0 to finetune.steps every finetune.save_every)"
            )

    def _check_names(self) -> None:
        """Models and datasets: plain, not reserved, known and not repeated."""
        if not self.models:
            raise ConfigError("models: the list is empty; name at least one model of the zoo")
        for name in self.zoo:
            check_plain_name(f"zoo.{name}", name)
        for name in self.models:
            check_plain_name("models", name)
            if name in RESERVED:
                raise ConfigError(
                    f"models: {name!r} is reserved (predictions/{name}/ holds another stage's "
                    "outputs); rename the model"
                )
            if name not in self.zoo:
                raise ConfigError(f"unknown model {name!r}; the zoo has {sorted(self.zoo)}")
        if not self.datasets:
            raise ConfigError("datasets: the list is empty; name at least one entry of data")
        for name in self.data:
            check_plain_name(f"data.{name}", name)
            if name in RESERVED_DATA:
                raise ConfigError(
                    f"data.{name}: {name!r} is reserved (data/{name}/ holds the source stage's "
                    "digests); rename the dataset"
                )
        for name in self.datasets:
            check_plain_name("datasets", name)
            if name not in self.data:
                raise ConfigError(f"unknown dataset {name!r}; data has {sorted(self.data)}")
        if len(set(self.datasets)) != len(self.datasets) or len(set(self.models)) != len(
            self.models
        ):
            raise ConfigError("models and datasets must not repeat a name")

    def _check_shift(self) -> None:
        for source, targets in self.shift.items():
            for name in (source, *targets):
                if name not in self.data:
                    raise ConfigError(f"shift.{source}: unknown dataset {name!r}")
            if source in targets:
                raise ConfigError(f"shift.{source}: a dataset is not shifted from itself")

    def _check_methods(self) -> None:
        """What the prior and the evaluated methods need: a validation split, a scalar prior
        for val_nll, LoRA dropout for MC dropout."""
        needs_val = [m for m in self.evaluate.methods if m in ("la_val", "temperature")]
        if self.prior.method == "val_nll":
            needs_val.insert(0, "prior.method val_nll")
        for name in self.datasets:
            if needs_val and self.data[name].val_size == 0:
                raise ConfigError(
                    f"{', '.join(needs_val)} need(s) a validation split, and data.{name}.val_size "
                    "is 0: set it > 0, or drop the method from evaluate.methods (and use "
                    "prior.method marglik)"
                )
        if self.prior.method == "val_nll" and self.prior.structure != "scalar":
            raise ConfigError(
                "prior.method val_nll supports prior.structure scalar only (one precision tuned "
                "on the validation NLL); use prior.method marglik for a layerwise prior"
            )
        if "mc_dropout" in self.evaluate.methods:
            for name in self.models:
                if self.zoo[name].dropout == 0:
                    raise ConfigError(
                        f"evaluate.methods has mc_dropout, and zoo.{name}.dropout is 0: MC "
                        "dropout needs LoRA dropout > 0; drop mc_dropout or set the dropout"
                    )

    def _check_processes(self) -> None:
        """Every process of a data-parallel stage needs a share of every fine-tuning batch and
        at least one batch of factor fitting."""
        n = self.launch.nproc_per_node
        if n == 1:
            return
        if n > self.finetune.batch_size:
            raise ConfigError(
                f"launch.nproc_per_node {n} exceeds finetune.batch_size {self.finetune.batch_size}"
                ": every process needs at least one example per step"
            )
        for name in self.datasets:
            data = self.data[name]
            n_fit = data.n_train - data.val_size
            batches = -(-n_fit // self.kfac.batch_size)
            if n > batches:
                raise ConfigError(
                    f"launch.nproc_per_node {n} exceeds the {batches} factor-fitting batches of "
                    f"{name} ({n_fit} training prompts at most, kfac.batch_size "
                    f"{self.kfac.batch_size}): lower launch.nproc_per_node or kfac.batch_size"
                )

    def card(self, model: str) -> ModelCard:
        """The zoo card of ``model``, with a clear error for an unknown name."""
        if model not in self.zoo:
            raise ConfigError(f"unknown model {model!r}; the zoo has {sorted(self.zoo)}")
        return self.zoo[model]

    def shifted(self, source: str) -> list[str]:
        """The test sets the final checkpoint fine-tuned on ``source`` is also scored on (any
        entry of ``data``, whether the study trains on it or not)."""
        return list(self.shift.get(source, ()))

    def scored(self) -> list[str]:
        """Every dataset the study scores on, once each, in order: the trained ``datasets``,
        then their shift targets."""
        targets = [t for name in self.datasets for t in self.shifted(name)]
        return list(dict.fromkeys([*self.datasets, *targets]))

    def dataset(self, name: str) -> DataConfig:
        """The data section of dataset ``name``, with a clear error for an unknown name."""
        if name not in self.data:
            raise ConfigError(f"unknown dataset {name!r}; data has {sorted(self.data)}")
        return self.data[name]


def load_section(cls: type[T], raw: Any, key: str) -> T:
    """Load one params section (``raw``, a mapping) into the frozen dataclass ``cls``."""
    return _from_dict(cls, raw, key)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate the whole params file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    missing = [f.name for f in dataclasses.fields(Params) if f.name not in raw]
    if missing:
        raise ConfigError(
            f"{path}: section(s) {missing} missing; every section must be given (DVC writes "
            "the full composition of conf/ into params.yaml: run dvc exp run, or copy the "
            "section from conf/config.yaml)"
        )
    params = _from_dict(Params, raw, "")
    for name in params.scored():
        data = params.data[name]
        folder = resolve_dir(data.local_dir, path.parent)
        if data.source == "local" and not folder.is_dir():
            raise ConfigError(
                f"data.{name}.local_dir: {data.local_dir!r} is not a folder (looked in {folder})"
            )
    check_study(params)
    return params


def check_study(params: Params) -> None:
    """What the params decide beyond their own sections: each dataset is a known one, and a
    shifted test set answers with the same tokens as the dataset it is shifted from."""
    from lalora.data import DATASETS, answers_of

    for name in params.scored():
        if params.data[name].name not in DATASETS:
            raise ConfigError(
                f"data.{name}.name: unknown dataset {params.data[name].name!r}; known: "
                f"{sorted(DATASETS)}"
            )
    for source in params.datasets:
        answers = answers_of(params.data[source])
        for target in params.shifted(source):
            theirs = answers_of(params.data[target])
            if theirs != answers:
                raise ConfigError(
                    f"shift.{source}: {target} answers {list(theirs)}, {source} answers "
                    f"{list(answers)}: a shifted test set needs the same answers"
                )


def compose(conf_dir: str | Path = "conf", overrides: list[str] | None = None) -> dict:
    """The Hydra composition of ``conf/`` as DVC writes it into params.yaml
    (``dvc config hydra.enabled true``; ``dvc exp run -S model=phi2`` adds overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=True)
