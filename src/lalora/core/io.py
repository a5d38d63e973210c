"""Atomic writes: a file or folder appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: str | Path, folder: bool = False) -> None:
    """Give a temporary file (``mkstemp``: 0600) or folder (``mkdtemp``: 0700) the permissions
    of a plain ``open``/``mkdir`` under the user's umask, so a team's shared folder stays
    readable by the team."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        share(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure as a PNG at ``path`` atomically (a temporary file and a
    rename), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        share(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented json, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


STAGING = ".staging-"  # marks the folders this program writes before renaming them into place


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder ``tmp`` into place at ``final`` (replacing an old one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}{STAGING}old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def staging_dir(final: Path) -> Path:
    """A fresh temporary folder ``.{name}.staging-XXXXXXXX`` next to ``final`` for
    :func:`publish_dir` (``.dvcignore`` keeps such folders out of DVC outputs)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{STAGING}"))
    share(tmp, folder=True)
    return tmp


def clean_staging(parent: Path, name: str) -> list[Path]:
    """Remove the staging folders left in ``parent`` by a killed run for the final folder(s)
    ``name`` (a glob pattern, e.g. ``step-[0-9]*``): only folders named by :func:`staging_dir`
    or :func:`publish_dir`. Returns what was removed."""
    if not parent.is_dir():
        return []
    stale = sorted(
        p for p in parent.glob(f".{name}{STAGING}*") if p.is_dir() and not p.is_symlink()
    )
    for p in stale:
        shutil.rmtree(p)
    return stale


def read_json(path: str | Path, stage: str) -> Any:
    """A json artifact written by ``stage``; missing or malformed raises
    :class:`~lalora.core.errors.ArtifactError` naming the file and the stage."""
    from lalora.core.errors import ArtifactError

    path = Path(path)
    if not path.exists():
        raise ArtifactError(path, "missing", stage)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(path, f"unreadable ({type(err).__name__}: {err})", stage) from None


def check_safetensors(path: str | Path, stage: str) -> list[str]:
    """The tensor names of a safetensors file, after checking that its header is complete and
    covers the whole file (a truncated file fails here); else an ArtifactError naming it."""
    from safetensors import safe_open

    from lalora.core.errors import ArtifactError

    path = Path(path)
    if not path.exists():
        raise ArtifactError(path, "missing", stage)
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as err:  # SafetensorError, OSError
        raise ArtifactError(path, f"unreadable ({type(err).__name__}: {err})", stage) from None


def save_predictions(
    path: str | Path, probs: dict[str, Any], labels: Any, ids: list[str], info: dict
) -> None:
    """Per-example predictive probabilities of each method (``probs[method]`` (N, C)), the
    labels (N,) and example ids, as one safetensors file (ids and ``info`` in its metadata),
    written atomically."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"probs/{k}": v.double().contiguous() for k, v in probs.items()}
    tensors["labels"] = torch.as_tensor(labels).long().contiguous()
    meta = {"ids": json.dumps(ids), "info": json.dumps(info)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        share(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_predictions(path: str | Path, stage: str = "evaluate") -> tuple[dict, Any, list[str]]:
    """``(probs by method, labels, ids)`` from :func:`save_predictions`'s file; a missing or
    corrupt file raises an ArtifactError naming it and ``stage``."""
    from safetensors import safe_open

    from lalora.core.errors import ArtifactError

    check_safetensors(path, stage)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    if "labels" not in tensors or "ids" not in meta:
        raise ArtifactError(path, "not a predictions file (labels or ids missing)", stage)
    probs = {k.removeprefix("probs/"): v for k, v in tensors.items() if k.startswith("probs/")}
    return probs, tensors["labels"], json.loads(meta["ids"])
