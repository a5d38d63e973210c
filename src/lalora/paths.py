"""Where a relative data folder lives, also inside DVC's experiment workspaces.

``dvc exp run --queue`` and ``--temp`` run an experiment in a copy of the project at
``<project>/.dvc/tmp/exps/<workspace>/``. A relative ``local_dir`` that stays inside the project
(``tinydata/obqa``) names the experiment's own copy; one that leaves it (``../shared/data/...``)
names a folder beside the project, so it resolves against the project itself, not against the
workspace (where ``..`` would land inside ``.dvc/tmp/exps``).
"""

from __future__ import annotations

import os
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
