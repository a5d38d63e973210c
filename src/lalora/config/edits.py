"""Edits of ``params.yaml`` that ``dvc exp run -S`` would drop.

With Hydra composition on (``.dvc/config``: ``hydra.enabled``), ``dvc exp run -S key=value``
writes ``params.yaml`` afresh from ``conf/`` and the overrides, before any stage starts. A value
changed by hand in ``params.yaml`` itself is then gone, and no stage can tell it was there.
:func:`lost_edits` finds those values, and :func:`check` refuses the run naming them; the Hydra
plugin in ``hydra_plugins/lalora_params.py`` calls :func:`main` (in a child process) each time
DVC composes ``params.yaml``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lalora.config.base import ConfigError

_MISSING = "<absent>"
SHOWN = 12  # the lost edits a refusal lists one by one


@dataclass(frozen=True)
class LostEdit:
    """One leaf of ``params.yaml`` (dotted ``key``) whose hand-made value (``held``) the
    composition would replace by ``composed`` (``<absent>``: the key would be dropped or is new)."""

    key: str
    held: Any
    composed: Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested mapping by dotted key; lists and scalars are leaves."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def lost_edits(held: dict, base: dict, composed: dict) -> list[LostEdit]:
    """The leaves of ``held`` (today's params.yaml) that the composition drops.

    ``base`` is ``conf/`` composed without overrides, ``composed`` with the run's overrides. A
    leaf is lost where params.yaml differs from what the run composes and the overrides did not
    set it (the composed value is conf's own): the value came from a hand edit (or from an
    earlier experiment's overrides) and this run would silently replace it."""
    h, b, c = flatten(held), flatten(base), flatten(composed)
    lost = []
    for key in sorted(h.keys() | b.keys()):
        now, mine, then = h.get(key, _MISSING), b.get(key, _MISSING), c.get(key, _MISSING)
        if now != then and then == mine:
            lost.append(LostEdit(key, now, then))
    return lost


def message(params_file: Path, lost: list[LostEdit]) -> str:
    """One paragraph naming the lost values and where to make them instead."""
    lines = [
        f"  {e.key}: {json.dumps(e.held)} (this run would use {json.dumps(e.composed)})"
        for e in lost[:SHOWN]
    ]
    if len(lost) > SHOWN:
        lines.append(f"  ... and {len(lost) - SHOWN} more")
    return (
        f"{params_file} holds values that neither conf/ nor this run's -S overrides give, and "
        "`dvc exp run -S` writes params.yaml afresh from conf/ (Hydra composition), so this "
        "run would drop them:\n" + "\n".join(lines) + "\n"
        "Make each change in conf/ (conf/config.yaml or the group's file) or pass it as one "
        "more `-S key=value`; `git checkout params.yaml` discards the edits. With "
        "`dvc config hydra.enabled false`, -S edits params.yaml itself instead (config groups "
        "such as model=phi2 are then not composed)."
    )


def _compose(conf_dir: Path, config_name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def check(
    params_file: Path, conf_dir: Path, overrides: list[str], config_name: str = "config"
) -> None:
    """Raise :class:`ConfigError` if composing ``conf_dir`` with ``overrides`` into
    ``params_file`` would drop values edited there by hand (:func:`lost_edits`)."""
    if not params_file.is_file():
        return
    try:
        held = yaml.safe_load(params_file.read_text()) or {}
    except yaml.YAMLError:
        return  # nothing readable to keep: the composition replaces it
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        base = _compose(conf_dir, config_name, [])
        composed = _compose(conf_dir, config_name, list(overrides))
    except (HydraException, OmegaConfBaseException):
        return  # DVC's own composition names what does not compose
    lost = lost_edits(held, base, composed)
    if lost:
        raise ConfigError(message(params_file, lost))


def main(argv: list[str] | None = None) -> int:
    """``python -c 'from lalora.config.edits import main; main()' REQUEST``: REQUEST is a JSON
    object (params_file, conf_dir, config_name, overrides). Exit 2 with the refusal on stderr."""
    req = json.loads((argv or sys.argv[1:])[0])
    try:
        check(Path(req["params_file"]), Path(req["conf_dir"]), req["overrides"], req["config_name"])
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    return 0
