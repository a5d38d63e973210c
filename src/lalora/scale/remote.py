"""The study's DVC remote, and the fine-tuning checkpoints a job mirrors onto it.

The remote is DVC's own (``dvc push`` / ``dvc pull`` move every cached output; the model cache
``$LALORA_CACHE`` is rebuilt on each machine from its source, keyed by the file's sha256).
``.dvc/config`` names a default remote ``shared``: a folder beside the project
(``../lalora-remote``), which works out of the box on one machine or a shared filesystem;
:func:`configure` (``make remote``) points it, in the clone's own ``.dvc/config.local``, at
``$LALORA_REMOTE``: another folder, ``s3://bucket/path`` (extra ``[s3]``, the ``dvc-s3``
plugin) or ``ssh://host/path`` (extra ``[ssh]``, ``dvc-ssh``).

A grid job (:mod:`lalora.scale.launcher`) runs in a clone that it deletes when it ends, so its
persistent fine-tuning checkpoints (outside DVC's cache until the stage completes) would be lost
with a preempted job. :class:`Mirror` copies each completed checkpoint folder onto the remote's
filesystem (DVC's, so the same URL and credentials serve), under ``lalora/checkpoints/<key>/``,
and restores them into a new clone before the study runs. :func:`lalora.training.finetune.train`
then resumes from the last one whose fingerprint (model card, schedule, data, code and library
versions) is the run's own, and moves any other aside: a mirrored checkpoint is reused only by
the same run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lalora.core.errors import UserError

NAME = "shared"
ENV = "LALORA_REMOTE"
PLUGINS = {"s3": ("dvc_s3", "s3"), "ssh": ("dvc_ssh", "ssh")}


class RemoteError(UserError):
    """The remote is not configured, or its plugin is not installed."""


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``dvc`` (this interpreter's) in ``cwd``; a failure raises :class:`RemoteError` with
    its output."""
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                         text=True)  # fmt: skip
    if res.returncode != 0:
        raise RemoteError(f"dvc {' '.join(args)} failed in {cwd}:\n{res.stdout}{res.stderr}")
    return res


def check_plugin(url: str) -> None:
    """Refuse a URL whose scheme needs a DVC plugin that is not installed."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in PLUGINS:
        module, extra = PLUGINS[scheme]
        try:
            __import__(module)
        except ImportError:
            raise RemoteError(
                f"{url}: a {scheme} remote needs the {module.replace('_', '-')} plugin: "
                f".venv/bin/pip install -e '.[{extra}]'"
            ) from None


def configure(url: str, project: Path = Path(".")) -> str:
    """Point the default remote ``shared`` at ``url`` for this clone only
    (``.dvc/config.local``); a relative folder is made absolute, so every clone that is given
    it names the same place. Returns the URL written."""
    if not url:
        raise RemoteError(f"no remote given: set ${ENV} (a folder, s3://... or ssh://...)")
    check_plugin(url)
    if "://" not in url:
        url = str(Path(url).expanduser().resolve())
    dvc(["remote", "add", "--local", "--force", "--default", NAME, url], project)
    return url


def url_of(project: Path) -> str:
    """The URL of ``project``'s default remote, as DVC resolves it (absolute for a folder)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise RemoteError(f"{project}: no default DVC remote; run make remote")
        url = repo.config["remote"][name]["url"]
    return url


STEP = re.compile(r"step-[0-9]+")


@dataclass
class Mirror:
    """Completed checkpoint folders (``step-<N>`` with its ``trainer.json``, published by an
    atomic rename) matching the globs ``patterns`` (relative to ``project``), copied to and
    from ``<remote>/lalora/checkpoints/<key>/`` under the same relative paths."""

    project: Path
    key: str
    patterns: tuple[str, ...]
    sent: set[str] = field(default_factory=set)

    def _remote(self):
        from dvc.repo import Repo

        with Repo(str(self.project)) as repo:
            remote = repo.cloud.get_remote(command="lalora mirror")
            return remote.fs, PurePosixPath(remote.path) / "lalora" / "checkpoints" / self.key

    def completed(self) -> list[Path]:
        """The checkpoint folders to mirror, relative to the project."""
        found = set()
        for pattern in self.patterns:
            for p in self.project.glob(pattern):
                if p.is_dir() and STEP.fullmatch(p.name) and (p / "trainer.json").is_file():
                    found.add(p.relative_to(self.project))
        return sorted(found)

    def push(self) -> list[str]:
        """Copy every completed checkpoint not yet sent (written to a staging name on the
        remote, then moved into place); returns what was sent."""
        new = []
        for rel in self.completed():
            stamp = f"{rel.as_posix()}:{os.stat(self.project / rel / 'trainer.json').st_mtime_ns}"
            if stamp not in self.sent:
                new.append((rel, stamp))
        if not new:  # nothing to send: no need to open the project's DVC remote
            return []
        fs, root = self._remote()
        done = []
        for rel, stamp in new:
            ckpt = self.project / rel
            dest = str(root / rel.as_posix())
            staging = str(root / rel.parent.as_posix() / f".{rel.name}.staging")
            for path in (staging, dest):
                if fs.exists(path):
                    fs.rm(path, recursive=True)
            for f in sorted(q for q in ckpt.rglob("*") if q.is_file()):
                inner = f.relative_to(ckpt)
                fs.makedirs(str(PurePosixPath(staging, *inner.parent.parts)), exist_ok=True)
                fs.put_file(str(f), f"{staging}/{inner.as_posix()}")
            fs.mv(staging, dest)
            self.sent.add(stamp)
            done.append(rel.as_posix())
        return done

    def restore(self) -> list[str]:
        """Copy the mirrored checkpoints into the project where absent; returns what was
        restored."""
        fs, root = self._remote()
        if not fs.exists(str(root)):
            return []
        folders: dict[PurePosixPath, list[str]] = {}
        for f in fs.find(str(root)):
            rel = PurePosixPath(f).relative_to(root)
            steps = [i for i, part in enumerate(rel.parts) if STEP.fullmatch(part)]
            if steps:
                folders.setdefault(PurePosixPath(*rel.parts[: steps[0] + 1]), []).append(f)
        done = []
        for rel, files in sorted(folders.items()):
            target = self.project / rel
            if target.exists():
                continue
            staging = target.parent / f".{target.name}.staging-restore"
            for f in files:
                local = staging / PurePosixPath(f).relative_to(root / rel)
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(local))
            staging.rename(target)
            done.append(rel.as_posix())
        return done


def main() -> None:
    """``python -m lalora.remote [URL]`` (``make remote``): point this clone's default remote
    at URL or ``$LALORA_REMOTE``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("url", nargs="?", default=os.environ.get(ENV, ""))
    args = parser.parse_args()
    print(f"dvc remote {NAME} (default, .dvc/config.local): {configure(args.url)}")
