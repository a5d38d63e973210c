"""Session fixtures shared by the test modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from filelock import FileLock

from tests.studies import Study, build_two_model_study

# Under pytest-xdist the workers, and the stage processes each starts, share the machine's
# cores: each gets its share of threads (torch's default is a thread per core in every process,
# which oversubscribes the cores; `make test` on 2 cores took 13 min of tests, 11 with this).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


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


# The three end-to-end modules, longest first: pytest-xdist (--dist loadscope) hands out modules
# in collection order, so these start at once on the workers (test_grid builds the shared study,
# which test_pipeline_e2e then finds ready) and the short modules fill in around them.
FIRST = ("test_grid.py", "test_four_choice_e2e.py", "test_pipeline_e2e.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))
