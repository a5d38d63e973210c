"""Session fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from tests.studies import Study, build_two_model_study


@pytest.fixture(scope="session")
def two_model_study(tmp_path_factory) -> Study:
    """The tiny two-model DVC study (:func:`tests.studies.two_models`), built once by
    ``dvc repro``; modules take copies (:func:`tests.studies.copy_study`), never this one."""
    return build_two_model_study(tmp_path_factory)
