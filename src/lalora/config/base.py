"""Reading a params section into a frozen dataclass (a clear error naming the key), the
defaults from ``conf/``, the composition of ``conf/`` as Hydra does it, plain names."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lalora.core.errors import UserError

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
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


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


def load_section(cls: type[T], raw: Any, key: str) -> T:
    """Load one params section (``raw``, a mapping) into the frozen dataclass ``cls``."""
    return _from_dict(cls, raw, key)


def compose(conf_dir: str | Path = "conf", overrides: list[str] | None = None) -> dict:
    """The Hydra composition of ``conf/`` as DVC writes it into params.yaml
    (``dvc config hydra.enabled true``; ``dvc exp run -S model=phi2`` adds overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=True)
