"""Entry point wrapper for the stage scripts: a :class:`~lalora.core.errors.UserError` exits with
status 2 and one paragraph on stderr, no traceback; ``--debug`` (or ``LALORA_DEBUG=1``) shows
the traceback. Anything else is a bug and keeps its traceback. With ``LALORA_TIMES`` set, a
finished stage records where its time went (:mod:`lalora.core.timing`)."""

from __future__ import annotations

import errno
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from lalora.core.errors import UserError
from lalora.core.timing import record

EXIT_USER_ERROR = 2


def run(main: Callable[[], None], argv: list[str] | None = None, timed: bool = True) -> None:
    """Call ``main()``; turn a user error into a short message and exit status 2. ``timed``:
    record the stage's time where ``LALORA_TIMES`` asks (not for ``lalora.scale.launch``'s own
    reading of the params, which the stage it starts records)."""
    args = sys.argv if argv is None else argv
    debug = "--debug" in args or os.environ.get("LALORA_DEBUG", "") not in ("", "0")
    while "--debug" in args:
        args.remove("--debug")
    stage = Path(args[0]).stem if args else "lalora"
    start = time.time()
    try:
        main()
        if timed:
            record(stage, list(args[1:]), start)
    except UserError as err:
        if debug:
            raise
        _fail(stage, str(err))
    except OSError as err:
        if debug or err.errno not in STORAGE_ERRORS:
            raise
        where = f" {err.filename}" if err.filename else ""
        _fail(
            stage,
            f"cannot write{where}: {err.strerror or err}. Free space or make the folder "
            "writable (the dequantised model cache is $LALORA_CACHE, ~/.cache/lalora by "
            "default), then rerun: finished stages are cached and fine-tuning resumes from its "
            "last checkpoint.",
        )


# a full disk, a quota, a read-only or forbidden folder: the machine's state, not a bug
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _fail(stage: str, message: str) -> None:
    text = textwrap.fill(f"{stage}: error: {message}", width=100, break_long_words=False)
    print(text + "\n(--debug or LALORA_DEBUG=1 shows the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
