"""Where a relative data folder lives, also inside DVC's experiment workspaces.

``dvc exp run --queue`` and ``--temp`` run an experiment in a copy of the project at
``<project>/.dvc/tmp/exps/<workspace>/``. A relative ``local_dir`` that stays inside the project
(``tinydata/obqa``) names the experiment's own copy; one that leaves it (``../shared/data/...``)
names a folder beside the project, so it resolves against the project itself, not against the
workspace (where ``..`` would land inside ``.dvc/tmp/exps``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EXPERIMENTS = (".dvc", "tmp", "exps")


def project_root(workspace: Path) -> Path:
    """The project whose ``.dvc/tmp/exps`` holds ``workspace`` (an experiment's copy), else
    ``workspace`` itself; absolute."""
    parts = Path(os.path.abspath(workspace)).parts
    for i in range(len(parts) - len(EXPERIMENTS)):
        if parts[i : i + len(EXPERIMENTS)] == EXPERIMENTS:
            return Path(*parts[:i])
    return Path(os.path.abspath(workspace))


def resolve_dir(folder: str | Path, root: Path) -> Path:
    """``folder`` as given when absolute; relative, against ``root`` (the workspace) if it stays
    inside it, else against :func:`project_root` of ``root``."""
    folder = Path(folder)
    if folder.is_absolute():
        return folder
    root = Path(os.path.abspath(root))
    here = Path(os.path.normpath(root / folder))
    if here == root or root in here.parents:
        return here
    return Path(os.path.normpath(project_root(root) / folder))


@dataclass(frozen=True)
class Layout:
    """Where the study keeps one model's artifacts for one dataset, under ``root`` (the
    project or an experiment's workspace): the paths ``dvc.yaml`` gives the stages (a test
    holds the two equal)::

        data/<dataset>/{train,val,test}.jsonl                split(name): prepared prompts
        models/<model>/<dataset>/prune.json                  prune(): the layers removed
        plots/prune/<model>/<dataset>.{csv,png}              prune_curve(ext): their distances
        models/<model>/<dataset>/checkpoints/step-<N>/       checkpoints(): training state
        models/<model>/<dataset>/adapters/step-<N>/          adapter(N): exported PEFT adapter
        models/<model>/<dataset>/kfac/step-<N>/              kfac(N): Kronecker factors
        models/<model>/<dataset>/prior/step-<N>.json         prior(N): tuned priors, temperature
        metrics/checkpoints/<model>/<dataset>/step-<N>.json  metrics(N): every method's scores
        predictions/<model>/<dataset>/step-<N>.safetensors   predictions(N): per example
        plots/train_loss/<model>/<dataset>.csv               train_loss()
        metrics/finetune/<model>/<dataset>.json              finetune_usage(): time, memory
        models/<model>/<dataset>/members/seed-<s>/           members(): the ensemble's runs
        predictions/members/<model>/<dataset>/               member_predictions()
        metrics/shift/<model>/<dataset>.json                 shift_metrics()
        predictions/shift/<model>/<dataset>/                 shift_predictions()
    """

    model: str
    dataset: str
    root: Path = Path(".")

    @property
    def models(self) -> Path:
        return self.root / "models" / self.model / self.dataset

    def split(self, name: str) -> Path:
        """The dataset's prepared ``train``, ``val`` or ``test`` split."""
        return self.root / "data" / self.dataset / f"{name}.jsonl"

    def prune(self) -> Path:
        """The prune stage's choice of layers to remove (:mod:`lalora.models.prune`)."""
        return self.models / "prune.json"

    def prune_curve(self, ext: str = "csv") -> Path:
        """The prune stage's angular distance per block, ``csv`` or ``png``."""
        return self.root / "plots" / "prune" / self.model / f"{self.dataset}.{ext}"

    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    def adapter(self, step: int) -> Path:
        return self.models / "adapters" / f"step-{step}"

    def kfac(self, step: int) -> Path:
        return self.models / "kfac" / f"step-{step}"

    def prior(self, step: int) -> Path:
        return self.models / "prior" / f"step-{step}.json"

    def metrics(self, step: int) -> Path:
        return (
            self.root / "metrics" / "checkpoints" / self.model / self.dataset / f"step-{step}.json"
        )

    def predictions(self, step: int) -> Path:
        return self.root / "predictions" / self.model / self.dataset / f"step-{step}.safetensors"

    def train_loss(self) -> Path:
        """The fine-tuning loss curve (csv)."""
        return self.root / "plots" / "train_loss" / self.model / f"{self.dataset}.csv"

    def finetune_usage(self) -> Path:
        """The fine-tune's wall time and peak memory (json, a DVC metric)."""
        return self.root / "metrics" / "finetune" / self.model / f"{self.dataset}.json"

    def members(self) -> Path:
        """The deep ensemble's extra fine-tuning runs (their checkpoints)."""
        return self.models / "members"

    def member_predictions(self) -> Path:
        """The folder of the members' test predictions: ``members.json`` and
        ``seed-<s>.safetensors``."""
        return self.root / "predictions" / "members" / self.model / self.dataset

    def shift_metrics(self) -> Path:
        """``{target: metrics}`` of the final checkpoint on the shifted test sets."""
        return self.root / "metrics" / "shift" / self.model / f"{self.dataset}.json"

    def shift_predictions(self) -> Path:
        """The folder of the shifted targets' predictions: ``targets.json`` and
        ``<target>.safetensors``."""
        return self.root / "predictions" / "shift" / self.model / self.dataset
