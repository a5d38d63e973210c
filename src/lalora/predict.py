"""``python -m lalora.predict``: calibrated predictions for new inputs from a study's
artifacts (:mod:`lalora.study.predict`)."""

from lalora.core.cli import run
from lalora.study.predict import main

if __name__ == "__main__":
    run(main)
