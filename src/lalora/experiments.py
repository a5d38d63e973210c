"""``python -m lalora.experiments``: a commit's DVC experiments side by side, checkpoint by
checkpoint (:mod:`lalora.scale.experiments`)."""

from lalora.core.cli import run
from lalora.scale.experiments import main

if __name__ == "__main__":
    run(main)
