"""Standard output kept for one JSON object while a ``--json`` command runs.

Ray workers, libraries and stray ``print`` calls write to file descriptor 1; a ``--json`` command
promises that its stdout holds its summary and nothing else. :func:`reserve_stdout` points fd 1
(and ``sys.stdout``) at stderr for the duration and hands back the real stdout for the summary.

Example::

    with reserve_stdout(True) as out:
        result = run_the_job()          # anything it prints goes to stderr
        out.write(json.dumps(result) + "\\n")
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, TextIO


@contextlib.contextmanager
def reserve_stdout(enabled: bool) -> Iterator[TextIO]:
    """While enabled, file descriptor 1 points at stderr (Ray workers, libraries, prints).

    Yields the real stdout as a text stream for the final JSON object (``sys.stdout`` itself
    when not enabled).
    """
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    old_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout.flush()
        sys.stdout = old_stdout
        os.dup2(saved, 1)
        os.close(saved)
        real.flush()
        real.close()
