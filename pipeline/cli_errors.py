"""How a `spear` command fails: one ``error:`` line (or block) on stderr and an exit code.

Exit codes: 2 for a request that cannot be done as asked (a bad command line or config, an unknown
job, credentials in a config file); 1 for a run that failed (storage or cluster unreachable, a job
that raised; an unexpected failure names the run log holding its traceback, see
:mod:`spear.pipeline.run_log`).

Example::

    >>> SpearCLIError("--domain needs --input").exit_code
    2
    >>> SpearCLIError("cannot reach storage", exit_code=1).exit_code
    1
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import click

if TYPE_CHECKING:  # the CLI imports this module at start-up: the run log and the Jobs client load with their commands
    from spear.pipeline.run_log import Failure


class SpearCLIError(click.ClickException):
    """A failure told as ``error: <message>`` on stderr, without a traceback; exits ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # one clear line (or block), no traceback
        click.echo(f"error: {self.message}", err=True)


def failure_error(failure: "Failure") -> SpearCLIError:
    """The CLI error of a failed run: exit 2 for a config error, else 1."""
    return SpearCLIError(failure.line, exit_code=2 if failure.kind == "config" else 1)


@contextlib.contextmanager
def job_request_errors() -> Iterator[None]:
    """A Ray Jobs request that cannot be done as asked (:class:`~spear.cluster.jobs.JobError`) exits 2."""
    from spear.cluster.jobs import JobError  # start-up: only the job commands load the Jobs client

    try:
        yield
    except JobError as exc:
        raise SpearCLIError(str(exc)) from None
