"""``python -m lalora.remote``: point this clone's default DVC remote at
``$LALORA_REMOTE`` (:mod:`lalora.scale.remote`)."""

from lalora.core.cli import run
from lalora.scale.remote import main

if __name__ == "__main__":
    run(main)
