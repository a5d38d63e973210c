"""Typed, validated params sections.

Every section of ``params.yaml`` loads into a frozen dataclass through :func:`load_section`. An
unknown key, a value of the wrong type, an out-of-range value or an unknown model/dataset name
stops with a :class:`ConfigError` that names the offending key, in the spirit of nanoGPT's
configurator (an override must keep its default's type).

One module a concern: :mod:`.base` (loading, defaults, composition), :mod:`.model`,
:mod:`.data`, :mod:`.training`, :mod:`.evaluation`, :mod:`.launch`, :mod:`.laplace` (the
sections), :mod:`.params` (the whole file); the names are re-exported here.
"""

from lalora.config.base import (
    CONF_DIR,
    RESERVED,
    RESERVED_DATA,
    ConfigError,
    check_plain_name,
    compose,
    load_section,
    read_conf,
)
from lalora.config.data import DataConfig, SchemaConfig
from lalora.config.evaluation import EvaluateConfig
from lalora.config.laplace import KfacConfig, PredictiveConfig, PriorConfig
from lalora.config.launch import DEVICE_SPEC, LaunchConfig
from lalora.config.model import ModelCard
from lalora.config.params import Params, check_study, load_params
from lalora.config.training import EnsembleConfig, FinetuneConfig, PruneConfig

__all__ = [
    "CONF_DIR",
    "DEVICE_SPEC",
    "RESERVED",
    "RESERVED_DATA",
    "ConfigError",
    "DataConfig",
    "EnsembleConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "KfacConfig",
    "LaunchConfig",
    "ModelCard",
    "Params",
    "PredictiveConfig",
    "PriorConfig",
    "PruneConfig",
    "SchemaConfig",
    "check_plain_name",
    "check_study",
    "compose",
    "load_params",
    "load_section",
    "read_conf",
]
