"""Session fixtures shared by the test modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from filelock import FileLock

from tests.studies import Study, build_two_model_study


@pytest.fixture(scope="session")
def two_model_study(tmp_path_factory) -> Study:
    """The tiny two-model DVC study (:func:`tests.studies.two_models`), built once by
    ``dvc repro``; modules take copies (:func:`tests.studies.copy_study`), never this one.
    Under pytest-xdist the first worker to ask builds it and the others wait for it (a file
    lock in the session's shared temporary folder)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_two_model_study(tmp_path_factory)
    shared = tmp_path_factory.getbasetemp().parent
    record = shared / "two-model-study.json"
    with FileLock(str(record) + ".lock"):
        if not record.exists():
            study = build_two_model_study(tmp_path_factory)
            record.write_text(
                json.dumps(
                    {
                        "path": str(study.path),
                        "env": study.env,
                        "ran": sorted(study.ran),
                        "times": str(study.times),
                    }
                )
            )
    saved = json.loads(record.read_text())
    return Study(Path(saved["path"]), saved["env"], frozenset(saved["ran"]), Path(saved["times"]))
