"""The package's rooms and the direction imports may go (README, "Architecture"): read from the
source with :mod:`ast`, function-level imports included, as :mod:`lalora.core.provenance`
reads them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lalora"
# lowest first: a module may import its own room and the rooms below it, never one above
ROOMS = ("core", "config", "runtime", "data", "models", "laplace", "training", "study", "scale")
COMMANDS = "commands"  # src/lalora/<command>.py: the `python -m lalora.<command>` entry points


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``lalora`` modules ``path`` imports: for ``from lalora.x import y`` the submodule
    ``lalora.x.y`` where there is one, else ``lalora.x``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lalora"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "lalora":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules} - {_module(path)}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1] in ROOMS else COMMANDS


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of two or more
    modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_lives_in_a_room_or_is_a_command():
    rooms = {_room(m) for m in _modules()}
    assert rooms <= {*ROOMS, COMMANDS, "package"}, rooms
    for path in SRC.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert defs in ([], ["main"]), f"{path.name}: a command holds its main at most: {defs}"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_room_imports_from_a_room_above_it():
    rank = {room: i for i, room in enumerate(ROOMS)} | {COMMANDS: len(ROOMS)}
    upward = [
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if _room(m) != "package" and rank[_room(d)] > rank[_room(m)]
    ]
    assert upward == []


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_says_what_it_holds(room):
    doc = ast.get_docstring(ast.parse((SRC / room / "__init__.py").read_text()))
    assert doc and len(doc) > 20, room


def test_no_function_is_longer_than_sixty_lines():
    root = SRC.parents[1]
    files = [*SRC.rglob("*.py"), *(root / "bench").glob("*.py"), *(root / "stages").glob("*.py")]
    long = [
        f"{path.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []
