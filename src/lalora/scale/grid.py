"""A grid of studies: models x datasets x seeds (x any ``-S`` overrides), one DVC experiment
per cell, its resources and cost estimated from the model card before anything is submitted.

A grid file (``conf/sweep/<name>.yaml``)::

    name: paper                          # experiment names: <name>-<model>-<dataset>-s<seed>
    models: [llama2-7b, phi2]            # each becomes -S model=<m> (a conf/model option)
    datasets: [winogrande_s, obqa]       # -S data=<d>
    seeds: [0, 1, 2]                     # -S finetune.seed=<s>
    overrides: [finetune.lr=1e-4]        # -S given to every cell
    axes: {model: "model={}", dataset: "data={}", seed: "finetune.seed={}"}   # the default
    resources: {partition: gpu, timeout_min: 720}    # overrides of the estimate below
    throughput_tflops: 50                # sustained per-GPU compute the time estimate assumes

Resources per job (:func:`resources`): one GPU (none for a CPU card), its memory the largest
stage's estimated peak (:func:`lalora.models.memory.stage_memory`, where the card's config is at
hand; else the base weights at the card's precision plus a margin), host memory for loading the
weights, and a time limit twice the estimated run time plus an hour. The run time counts
forward and backward passes as 2 and 4 FLOPs per parameter and token (Kaplan et al. 2020):
fine-tuning (and each extra ensemble member), then per checkpoint the factor fit (a forward and
one backward per choice), the validation and test Jacobians (a backward per contrast) and MC
dropout's forwards, at ``throughput_tflops``; plus two minutes of model loading per stage run.
It is an estimate to size a request, printed with its assumptions, not a measurement.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from lalora.config import ConfigError, Params, compose, load_section
from lalora.config.edits import lost_edits
from lalora.config.edits import message as edits_message
from lalora.core.errors import UserError
from lalora.models.memory import DTYPE_BYTES

AXES = {"model": "model={}", "dataset": "data={}", "seed": "finetune.seed={}"}
RESOURCE_KEYS = ("gpus", "gpu_memory_gb", "memory_gb", "cpus", "timeout_min", "partition",
                 "account", "qos", "constraint")  # fmt: skip
LOAD_MINUTES = 2.0


class GridError(ConfigError):
    """A malformed grid file."""


@dataclass(frozen=True)
class Cell:
    """One study of the grid: its experiment ``name`` and its ``-S`` overrides."""

    model: str
    dataset: str
    seed: int
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """A grid file (see the module docstring)."""

    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    axes: dict = field(default_factory=lambda: dict(AXES))
    resources: dict = field(default_factory=dict)
    throughput_tflops: float = 50.0
    executor: dict = field(default_factory=dict)

    def shape(self) -> str:
        """``2 models x 1 dataset x 3 seeds``."""
        parts = [(len(self.models), "model"), (len(self.datasets), "dataset"),
                 (len(self.seeds), "seed")]  # fmt: skip
        return " x ".join(f"{n} {w}{'s' if n != 1 else ''}" for n, w in parts)

    def cells(self) -> list[Cell]:
        """Every (model, dataset, seed), models outermost. A cell's name ends in a digest of
        its full overrides, so an edit of ``overrides`` (or ``axes``) names new experiments
        and a landed one is always the run of these overrides (at this commit: ``dvc exp
        list`` lists HEAD's)."""
        out = []
        for m, d, s in itertools.product(self.models, self.datasets, self.seeds):
            axes = (self.axes["model"].format(m), self.axes["dataset"].format(d),
                    self.axes["seed"].format(s))  # fmt: skip
            overrides = (*axes, *self.overrides)
            key = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:6]
            out.append(Cell(m, d, s, f"{self.name}-{m}-{d}-s{s}-{key}", overrides))
        return out


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _names(raw: dict, key: str, path: Path) -> tuple:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise GridError(f"{path}: {key!r} must be a non-empty list, got {value!r}")
    for v in value:
        if not NAME.fullmatch(str(v)) or str(v).endswith((".", ".lock")):
            raise GridError(f"{path}: {key}: {v!r} is not a plain name (letters, digits, -_.)")
    _unique(value, key, path)
    return tuple(value)


def _unique(values: list, key: str, path: Path) -> None:
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise GridError(f"{path}: {key}: {twice} listed more than once (each would plan the "
                        "same cells twice under one experiment name)")  # fmt: skip


def load_grid(path: Path) -> Grid:
    """Read and check a grid file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"grid file not found: {path}") from None
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping")
    unknown = set(raw) - {f.name for f in fields(Grid)}
    if unknown:
        raise GridError(f"{path}: unknown key(s) {sorted(unknown)}; known: "
                        f"{[f.name for f in fields(Grid)]}")  # fmt: skip
    name = str(raw.get("name") or path.stem)
    if not NAME.fullmatch(name):
        raise GridError(f"{path}: name {name!r} is not a plain name")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise GridError(f"{path}: 'seeds' must be a list of integers, got {seeds!r}")
    _unique(seeds, "seeds", path)
    overrides = raw.get("overrides", [])
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                     .replace("\n...", "") for k, v in overrides.items()]  # fmt: skip
    if not all(isinstance(o, str) and "=" in o for o in overrides):
        raise GridError(f"{path}: 'overrides' must be key=value strings, got {overrides!r}")
    axes = {**AXES, **(raw.get("axes") or {})}
    if set(axes) != set(AXES) or not all("{}" in str(v) for v in axes.values()):
        unknown = sorted(set(axes) - set(AXES))
        raise GridError(f"{path}: 'axes' maps model, dataset and seed to a '-S' template with {{}}"
                        + (f"; unknown axis {unknown}" if unknown else ""))  # fmt: skip
    for axis, template in axes.items():
        try:
            str(template).format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise GridError(f"{path}: axes.{axis}: {template!r} is not a template with one {{}} "
                            f"({type(err).__name__}: {err})") from None  # fmt: skip
    resources = raw.get("resources") or {}
    bad = set(resources) - set(RESOURCE_KEYS)
    if bad:
        raise GridError(f"{path}: resources: unknown key(s) {sorted(bad)}; known: "
                        f"{list(RESOURCE_KEYS)}")  # fmt: skip
    tflops = raw.get("throughput_tflops", 50.0)
    if not isinstance(tflops, int | float) or tflops <= 0:
        raise GridError(f"{path}: throughput_tflops must be a positive number, got {tflops!r}")
    return Grid(name, _names(raw, "models", path), _names(raw, "datasets", path),
                tuple(seeds), tuple(overrides), axes, dict(resources), float(tflops),
                dict(raw.get("executor") or {}))  # fmt: skip


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def hydra_enabled(project: Path) -> bool:
    """Whether DVC composes ``project``'s params.yaml from ``conf/`` (``hydra.enabled``)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return bool(repo.config.get("hydra", {}).get("enabled", False))


@dataclass(frozen=True)
class Baseline:
    """What every cell of a plan starts from: whether DVC composes with Hydra, the params.yaml
    the cells' experiments would overwrite, and ``conf/`` composed without overrides."""

    hydra: bool
    held: dict
    base: dict

    @staticmethod
    def of(project: Path) -> Baseline:
        hydra = hydra_enabled(project)
        held = yaml.safe_load((project / "params.yaml").read_text()) or {}
        return Baseline(hydra, held, compose(project / "conf") if hydra else {})


def cell_params(project: Path, cell: Cell, baseline: Baseline | None = None) -> Params:
    """The params a cell's experiment runs with: ``conf/`` composed with its overrides when
    DVC composes params.yaml with Hydra (``hydra.enabled``), else ``params.yaml`` with each
    override applied as ``dvc exp run -S`` applies it. With Hydra, a hand edit of params.yaml
    that the composition would drop is refused here, as each cell's ``dvc exp run`` would."""
    baseline = baseline or Baseline.of(project)
    if baseline.hydra:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            raw = compose(project / "conf", list(cell.overrides))
        except (HydraException, OmegaConfBaseException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GridError(f"cell {cell.name}: its overrides do not compose: {first}") from None
        if lost := lost_edits(baseline.held, baseline.base, raw):
            raise GridError(f"cell {cell.name}: {edits_message(project / 'params.yaml', lost)}")
    else:
        raw = copy.deepcopy(baseline.held)
        for item in cell.overrides:
            key, value = item.split("=", 1)
            _set(raw, key, yaml.safe_load(value))
    try:
        return load_section(Params, raw, "")
    except ConfigError as err:
        raise GridError(f"cell {cell.name}: {err}") from None


@dataclass(frozen=True)
class Resources:
    """What one job asks for, and its estimated run time."""

    gpus: int
    gpu_memory_gb: float
    memory_gb: int
    cpus: int
    hours: float
    timeout_min: int
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""


def _flops(params: Params, model: str, dataset: str, tokens: int) -> float:
    """The cell's forward and backward FLOPs (module docstring)."""
    card, data, ft, ev = (params.card(model), params.data[dataset], params.finetune,
                          params.evaluate)  # fmt: skip
    from lalora.config.data import answers_of

    n = card.params_billion * 1e9
    c = len(answers_of(data))
    fit, val, test = data.n_train - data.val_size, data.val_size, data.n_test
    train = ft.steps * ft.batch_size * 6 * n * tokens * params.ensemble.members
    per_ckpt = tokens * n * (fit * (2 + 4 * c) + (val + test) * (2 + 4 * (c - 1)))
    if "mc_dropout" in ev.methods:
        per_ckpt += tokens * n * test * 2 * ev.mc_samples
    shifted = tokens * n * (2 + 4 * (c - 1)) * sum(params.data[t].n_test
                                                   for t in params.shifted(dataset))  # fmt: skip
    return train + len(params.checkpoints) * per_ckpt + shifted


def _gpu_memory_gb(params: Params, model: str) -> float:
    """The estimated peak over the heavy stages, from the card's config where it loads
    offline, else weights at the card's precision plus 30% and 4 GB."""
    from lalora.models.memory import GB, NF4_BITS, Sizes, architecture, stage_memory
    from lalora.models.zoo import load_tokenizer, model_config

    card = params.card(model)
    try:
        arch = architecture(model_config(card, len(load_tokenizer(card))), card)
    except (OSError, ValueError, UserError):  # offline without the hub card's files
        bits = NF4_BITS if card.quantization == "nf4" else 8 * DTYPE_BYTES[card.dtype]
        return card.params_billion * 1e9 * bits / 8 / GB * 1.3 + 4
    sizes = Sizes.of(params)
    return max(stage_memory(s, arch, card, sizes, 2).device.total
               for s in ("finetune", "fit_kfac", "tune_prior", "evaluate")) / GB  # fmt: skip


def resources(grid: Grid, params: Params, cell: Cell, tokens: int = 128) -> Resources:
    """A cell's job request (module docstring), ``grid.resources`` overriding the estimate;
    ``tokens``: the mean prompt length the time estimate assumes."""
    card = params.card(cell.model)
    gpu = card.source == "hub" or card.quantization == "nf4"
    stages = 1 + 3 * len(params.checkpoints) + 1 + (params.ensemble.members > 1)
    hours = (_flops(params, cell.model, cell.dataset, tokens) / (grid.throughput_tflops * 1e12)
             + stages * LOAD_MINUTES * 60) / 3600  # fmt: skip
    weights_gb = card.params_billion * DTYPE_BYTES[card.dtype]
    est = Resources(
        gpus=1 if gpu else 0, gpu_memory_gb=round(_gpu_memory_gb(params, cell.model), 1),
        memory_gb=math.ceil(2 * weights_gb + 16), cpus=8 if gpu else 2, hours=hours,
        timeout_min=math.ceil(2 * hours * 60 + 60),
    )  # fmt: skip
    return replace(est, **grid.resources)


def plan(project: Path, grid: Grid) -> tuple[list[tuple[Cell, Resources]], str]:
    """Every cell with its resources, and the table printed before submission: one row per
    model and dataset (its seeds alike), then the job count and GPU-hours."""
    baseline = Baseline.of(project)
    rows = [(c, resources(grid, cell_params(project, c, baseline), c)) for c in grid.cells()]
    lines = [f"grid {grid.name}: {len(rows)} jobs ({grid.shape()}), time at "
             f"{grid.throughput_tflops:g} TFLOP/s per GPU (an estimate)",
             "| model | dataset | seeds | GPUs | GPU memory (GB) | host memory (GB) | "
             "hours per job | time limit (min) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (m, d), group in itertools.groupby(rows, key=lambda r: (r[0].model, r[0].dataset)):
        group = list(group)
        r = group[0][1]
        lines.append(f"| {m} | {d} | {len(group)} | {r.gpus} | {r.gpu_memory_gb:.1f} | "
                     f"{r.memory_gb} | {r.hours:.2f} | {r.timeout_min} |")  # fmt: skip
    gpu_hours = sum(r.hours * max(r.gpus, 1) for _, r in rows)
    lines.append(f"total: {len(rows)} jobs, {gpu_hours:.1f} GPU-hours (CPU-hours for CPU cards)")
    return rows, "\n".join(lines)
