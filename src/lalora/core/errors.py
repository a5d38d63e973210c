"""Errors that are the user's to fix (a config value, a data file, a model card, a corrupt or
missing artifact, a diverged run), as opposed to bugs. Stages print them as one paragraph and
exit non-zero (:mod:`lalora.core.cli`); a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class NonFiniteError(UserError, FloatingPointError):
    """A loss, logit, factor or metric is NaN or infinite; the message names the module, batch
    or step."""


class ArtifactError(UserError):
    """A file written by an earlier stage is missing or corrupt."""

    def __init__(self, path: str | Path, problem: str, stage: str):
        self.path = Path(path)
        self.stage = stage
        super().__init__(
            f"{path}: {problem}. It is written by the {stage} stage: rerun that stage alone "
            f"(dvc repro -s -f {stage}@<its name>; dvc status lists the names) or delete the "
            "file and run dvc repro."
        )


class ModelError(UserError, RuntimeError):
    """A model cannot be loaded as configured (unknown name, 4-bit without CUDA, ...)."""
