"""The whole ``params.yaml``: its sections and the checks across them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lalora.config.base import (
    RESERVED,
    RESERVED_DATA,
    ConfigError,
    _from_dict,
    check_plain_name,
)
from lalora.config.data import ANSWERS, DataConfig, answers_of
from lalora.config.evaluation import EvaluateConfig
from lalora.config.laplace import KfacConfig, PredictiveConfig, PriorConfig
from lalora.config.launch import LaunchConfig
from lalora.config.model import ModelCard
from lalora.config.training import EnsembleConfig, FinetuneConfig, PruneConfig
from lalora.core.paths import resolve_dir


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
    for name in params.scored():
        if params.data[name].name not in ANSWERS:
            raise ConfigError(
                f"data.{name}.name: unknown dataset {params.data[name].name!r}; known: "
                f"{sorted(ANSWERS)}"
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
