"""Lines for people: progress and warnings go to stderr, so that a command's ``--json`` summary on
stdout stays clean.

:func:`console_log` is the one way to get such a logger: every job and stage that reports progress
takes one (or a ``progress`` flag it turns into one). It pickles, so a Ray task can take it along;
Ray forwards a task's stderr to the driver's console, line by line.

Example::

    >>> log = console_log(False)
    >>> log("nothing is printed")
    >>> console_log(True, prefix="[tokenize] ")("pass 1 done")   # doctest: +SKIP
    [tokenize] pass 1 done
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Union


def print_line(line: str, prefix: str = "") -> None:
    """``prefix + line`` to stderr, flushed at once."""
    print(prefix + line, file=sys.stderr, flush=True)


def _drop(line: str) -> None:
    """A logger that says nothing."""


def console_log(progress: Union[bool, Callable[[str], None]] = True, prefix: str = "") -> Callable[[str], None]:
    """A logger: ``progress`` itself when it is one, else lines to stderr (with ``prefix``) when it is
    true, else one that drops them."""
    if callable(progress):
        return progress
    if not progress:
        return _drop
    return functools.partial(print_line, prefix=prefix) if prefix else print_line
