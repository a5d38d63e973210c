"""The code fingerprint of persistent state, and the DAG's declared code dependencies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lalora.core.provenance import code_fingerprint, library_versions, module_closure

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lalora"


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_each_stage_declares_exactly_the_modules_its_script_imports(name):
    """Both ways: a module the script imports (transitively, lazy imports included) and
    dvc.yaml does not declare would let a code change keep stale outputs; a declared module it
    does not import reruns the stage for nothing."""
    stage = _stages()[name]
    scripts = re.findall(r"stages/\w+\.py", stage["cmd"])
    assert len(scripts) == 1, stage["cmd"]
    script = ROOT / scripts[0]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    assert scripts[0] in deps, f"{name}: the script {scripts[0]} is not a dependency"
    declared = {d for d in deps if d.startswith("src/")}
    imported = {p.relative_to(ROOT).as_posix() for p in module_closure(script, SRC)}
    missing, extra = sorted(imported - declared), sorted(declared - imported)
    assert not missing, f"{name}: imported but not declared in dvc.yaml: {missing}"
    assert not extra, f"{name}: declared in dvc.yaml but not imported: {extra}"


def test_the_lock_file_records_the_stages_dvc_yaml_defines_and_no_others():
    """DVC keeps a lock entry after its stage leaves dvc.yaml (a renamed layout, a checkpoint
    no longer listed) and rewrites the whole file after every stage it runs, so a stale entry
    costs every repro time and says something about outputs nothing produces."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        defined = {stage.name for stage in repo.index.stages}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert not locked - defined, f"dvc.lock entries of no stage: {sorted(locked - defined)}"


def test_the_closure_follows_lazy_and_submodule_imports(tmp_path):
    src = tmp_path / "lalora"
    (src / "sub").mkdir(parents=True)
    for rel, text in {
        "__init__.py": "",
        "a.py": "def f():\n    from lalora.sub import c\n",
        "b.py": "import os\n",
        "sub/__init__.py": "X = 1\n",
        "sub/c.py": "import lalora.b\n",
        "unused.py": "",
    }.items():
        (src / rel).write_text(text)
    script = tmp_path / "stage.py"
    script.write_text("from lalora.a import f\n")
    names = [p.relative_to(src).as_posix() for p in module_closure(script, src)]
    assert names == ["a.py", "b.py", "sub/__init__.py", "sub/c.py"]
    # a package's __init__.py that holds only its docstring runs no code: left out
    (src / "sub" / "__init__.py").write_text('"""A room."""\n')
    names = [p.relative_to(src).as_posix() for p in module_closure(script, src)]
    assert names == ["a.py", "b.py", "sub/c.py"]


def test_the_fingerprint_changes_with_any_imported_module_and_nothing_else(tmp_path):
    src = tmp_path / "lalora"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "loss.py").write_text("SIGN = 1\n")
    (src / "other.py").write_text("X = 0\n")
    script = tmp_path / "stage.py"
    script.write_text("from lalora.loss import SIGN\n")
    before = code_fingerprint(script, src)
    (src / "other.py").write_text("X = 1\n")  # not imported
    assert code_fingerprint(script, src) == before
    (src / "loss.py").write_text("SIGN = -1\n")  # the loss flipped
    assert code_fingerprint(script, src) != before
    (src / "loss.py").write_text("SIGN = 1\n")
    assert code_fingerprint(script, src) == before
    script.write_text("from lalora.loss import SIGN  # edited\n")
    assert code_fingerprint(script, src) != before


def test_the_fingerprint_covers_the_library_versions(monkeypatch, tmp_path):
    import lalora.core.provenance as prov

    script = tmp_path / "stage.py"
    script.write_text("")
    before = code_fingerprint(script, SRC)
    assert set(library_versions()) == {"torch", "transformers", "peft"}
    monkeypatch.setattr(prov, "library_versions", lambda: {"torch": "9.9", "peft": "0"})
    assert code_fingerprint(script, SRC) != before


def test_a_lazily_re_exported_name_is_followed_to_its_module(tmp_path):
    """``from lalora.laplace import fit_kfac`` runs kfac.py (through the package's lazy
    ``__getattr__``): the closure has it, and not the package's other modules."""
    script = tmp_path / "stage.py"
    script.write_text("from lalora.laplace import fit_kfac, tune_priors\n")
    names = {p.relative_to(SRC).as_posix() for p in module_closure(script, SRC)}
    assert {"laplace/__init__.py", "laplace/kfac.py", "laplace/tuning.py"} <= names
    assert "laplace/peft.py" not in names and "laplace/exact.py" not in names
