"""What determines a result that lives outside DVC's cache: the code and the library versions.

A stage's persistent state (fine-tuning checkpoints, which resume) is reused only when a
fingerprint of everything that determines it matches. The code part of that fingerprint is the
stage script and every ``lalora`` module it imports, transitively (read from the source with
:mod:`ast`, so lazy imports inside functions count too): the same set ``dvc.yaml`` declares as the
stage's ``deps`` (a test holds the two equal). ``lalora/__init__.py`` holds only the package
version, and a room's ``__init__.py`` only its docstring: both are left out.
"""

from __future__ import annotations

import ast
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = "lalora"
SRC = Path(__file__).resolve().parents[1]  # src/lalora
# the libraries whose numerics determine trained weights
LIBRARIES = ("torch", "transformers", "peft")


def _module_file(name: str, src: Path) -> Path | None:
    """The file of module ``lalora.x.y`` under ``src`` (``src/lalora``), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) == 1:
        return None
    base = src.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imported(tree: ast.AST, src: Path) -> set[Path]:
    """Files of the ``lalora`` modules one source file imports: every package on the dotted
    path (importing ``lalora.laplace.kfac`` runs ``lalora/laplace/__init__.py``) and, for
    ``from lalora.pkg import name``, ``name`` itself where it is a submodule, or the submodule
    that ``pkg`` re-exports it from lazily (its ``_EXPORTS``, :func:`lazy_exports`)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            exports = lazy_exports(node.module, src)
            for alias in node.names:
                names.append(f"{node.module}.{alias.name}")
                if alias.name in exports:
                    names.append(f"{node.module}.{exports[alias.name]}")
    out = set()
    for name in names:
        parts = name.split(".")
        for k in range(2, len(parts) + 1):
            path = _module_file(".".join(parts[:k]), src)
            if path is not None:
                out.add(path)
    return out


def lazy_exports(package: str, src: Path = SRC) -> dict[str, str]:
    """``{name: submodule}`` of a ``lalora`` package whose ``__init__.py`` re-exports names
    lazily through a literal ``_EXPORTS`` dict (``lalora.laplace``); empty for any other."""
    path = _module_file(package, src)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return {
                k.value: v.value
                for k, v in zip(node.value.keys, node.value.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
            }
    return {}


def _docstring_only(path: Path) -> bool:
    """``path`` holds a docstring and nothing else (a room's ``__init__.py``): no code runs."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def module_closure(script: Path, src: Path = SRC) -> list[Path]:
    """The ``lalora`` source files ``script`` imports, directly or through each other, and the
    package data files they read (a file of ``resources/`` whose name one of them spells out),
    sorted (``lalora/__init__.py`` and the ``__init__.py`` that hold only a docstring excluded,
    see the module docstring)."""
    seen: set[Path] = set()
    todo = [Path(script).resolve()]
    while todo:
        path = todo.pop()
        for dep in _imported(ast.parse(path.read_text(), filename=str(path)), src):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    seen.discard(src / "__init__.py")
    seen -= {p for p in seen if p.name == "__init__.py" and _docstring_only(p)}
    data = sorted((src / "resources").glob("*")) if (src / "resources").is_dir() else []
    texts = [p.read_text() for p in seen]
    seen |= {f for f in data if any(f'"{f.name}"' in t for t in texts)}
    return sorted(seen)


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (``"absent"`` for one not installed)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def code_fingerprint(script: Path, src: Path = SRC) -> str:
    """A sha256 (16 hex digits) of the contents of ``script``, of every ``lalora`` module it
    imports (:func:`module_closure`) and of the installed :data:`LIBRARIES` versions: it changes
    with any edit to code that runs in the stage, and with an upgrade of torch, transformers or
    peft."""
    h = hashlib.sha256()
    root = src.parent
    for path in [Path(script).resolve(), *module_closure(script, src)]:
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            name = path.name
        data = path.read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    for name, ver in sorted(library_versions().items()):
        h.update(f"{name}=={ver}\0".encode())
    return h.hexdigest()[:16]
