"""A Hydra plugin that refuses a ``dvc exp run -S`` which would drop hand edits of params.yaml.

DVC loads Hydra plugins from the project root (``hydra.plugins_path``) each time it composes
``params.yaml`` from ``conf/``; Hydra then asks every search-path plugin for its paths, which is
where this one checks, in a child process, that the file about to be overwritten holds nothing
the composition would lose (:mod:`lalora.config.edits`). Outside DVC's composition it does
nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

_CHILD = "from lalora.config.edits import main; main()"


def _dvc_composition() -> dict | None:
    """The arguments of DVC's ``compose_and_dump`` if it is on the call stack, else None."""
    frame = sys._getframe(1)
    while frame is not None:
        names = frame.f_locals
        if frame.f_code.co_name == "compose_and_dump" and "overrides" in names:
            return names
        frame = frame.f_back
    return None


class KeepParamsEdits(SearchPathPlugin):
    """Adds no search path; stops DVC's composition when it would drop an edit."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        call = _dvc_composition()
        if call is None or not call.get("config_dir"):
            return
        if importlib.util.find_spec("lalora") is None:
            return  # DVC runs outside the project's environment: nothing to check with
        request = {
            "params_file": os.path.abspath(str(call["output_file"])),
            "conf_dir": str(call["config_dir"]),
            "config_name": str(call["config_name"]),
            "overrides": [str(o) for o in call["overrides"]],
        }
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(request)], capture_output=True, text=True
        )
        if res.returncode == 0:
            return
        from dvc.exceptions import DvcException

        if res.returncode == 2:
            raise DvcException(res.stderr.strip())
        raise DvcException(f"checking params.yaml for hand edits failed:\n{res.stderr[-2000:]}")
