"""One log file per job run, and a failure told in one line.

Every job command (``decode``, ``tokenize``, ``train``, ``evaluate``, ``export``, ``run``, ``demo``,
``status``, ``plan``, and the same commands run as submitted Ray Jobs) writes a log file in
``$SPEAR_LOG_DIR``, else ``$SPEAR_CACHE_DIR/logs``, else ``~/.cache/spear/logs``, named
``<command>-<UTC time>-<pid>.log``. It holds the command's options, spear's log records and, when
the run fails, the full traceback (Ray's remote tracebacks included). The terminal gets one
``error: <root cause> (full log: PATH)`` line; ``--verbose`` prints the traceback on stderr too, and
so does a submitted job (its stderr is the job log that ``spear logs`` shows). Secrets are masked
in everything written.

Example::

    with RunLog("train", {"max_steps": 10}, secrets=[]) as run:
        try:
            ...
        except Exception as exc:
            failure = run.failure(exc)      # traceback to the file
            print("error:", failure.line)   # root cause + "(full log: ...)"
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from pydantic import ValidationError

from spear.cluster.jobs import JobError
from spear.cluster.ray_runtime import RayConnectionError
from spear.cluster.storage import StorageError, mask
from spear.config import ConfigError, describe_validation_error

#: Newest run logs kept in the log folder; older ones are removed when a run ends.
KEEP_LOGS = 200
#: Set in the driver of a submitted Ray Job (by Ray's job supervisor).
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_submitted_job() -> bool:
    """Whether this process is the driver of a submitted Ray Job (`spear submit`)."""
    return bool(os.environ.get(_RAY_JOB_ENV))


def log_dir() -> Path:
    """Where run logs go: $SPEAR_LOG_DIR, else $SPEAR_CACHE_DIR/logs, else ~/.cache/spear/logs."""
    if os.environ.get("SPEAR_LOG_DIR"):
        return Path(os.environ["SPEAR_LOG_DIR"]).expanduser()
    cache = os.environ.get("SPEAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
    return Path(cache) / "logs"


# --------------------------------------------------------------------------- what went wrong


def _is_ray(exc: BaseException) -> bool:
    return any(c.__module__.split(".", 1)[0] == "ray" for c in type(exc).__mro__)


def root_cause(exc: BaseException) -> tuple[BaseException, Optional[int]]:
    """The exception that started a failure, under Ray's wrappers (RayTaskError, Ray Train's
    TrainingFailedError / WorkerGroupError / ControllerError, ...); and the training worker rank
    it came from, where Ray Train says."""
    rank: Optional[int] = None
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)  # WorkerGroupError: {rank: exception}
        if isinstance(failures, Mapping) and failures:
            rank = min(failures)
            exc = failures[rank]
            continue
        inner = getattr(exc, "controller_failure", None)  # ControllerError
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if _is_ray(exc):
            cause = getattr(exc, "cause", None)  # RayTaskError (and its dual "as instance of cause" classes)
            if isinstance(cause, BaseException) and cause is not exc:
                exc = cause
                continue
            if exc.__cause__ is not None:
                exc = exc.__cause__
                continue
        break
    return exc, rank


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in text and lines:
        line = lines[-1]  # a remote traceback as text: its last line is the exception
    else:
        line = lines[0] if lines else ""
    # spear's own errors are worded for the user; for the rest the type is part of the cause
    if not type(exc).__module__.startswith("spear.") or not line:
        line = f"{type(exc).__name__}: {line}" if line and not line.startswith(type(exc).__name__) else (
            line or type(exc).__name__)
    return line if len(line) <= 1000 else line[:997] + "..."


@dataclass
class Failure:
    """A failed run as the terminal shows it."""

    line: str                 # the ``error:`` text (a block for config errors), secrets masked
    kind: str                 # "config" (exit 2), "known" (storage, cluster: their own line) or "unexpected"
    root: BaseException
    log_path: Optional[Path]


def describe_failure(exc: BaseException, secrets: Iterable[str] = ()) -> tuple[str, str, BaseException]:
    """(text, kind, root cause) of a failure; see :class:`Failure`."""
    root, rank = root_cause(exc)
    if isinstance(root, ConfigError):
        text, kind = str(root), "config"
    elif isinstance(root, ValidationError):  # a config checked inside a worker
        text, kind = describe_validation_error(root, f"({root.title}, checked by the job)"), "config"
    elif isinstance(root, (StorageError, RayConnectionError, JobError)):
        text, kind = str(root), "known"
    else:
        text, kind = _one_line(root), "unexpected"
    if rank is not None:
        text = f"training worker rank {rank}: {text}"
    return mask(text, secrets), kind, root


# --------------------------------------------------------------------------- the log file


class _MaskingFormatter(logging.Formatter):
    def __init__(self, fmt: str, secrets: list[str]):
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record), self.secrets)


class RunLog:
    """The log file of one run: spear's log records while it runs, the traceback if it fails."""

    def __init__(self, command: str, options: Mapping[str, Any], secrets: Iterable[str] = (), *,
                 verbose: bool = False):
        self.command = command
        self.options = dict(options)
        self.secrets = [s for s in secrets if s]
        self.verbose = verbose or in_submitted_job()
        self.path: Optional[Path] = None
        self._handlers: list[logging.Handler] = []
        self._logger = logging.getLogger("spear")
        self._level = self._logger.level

    def __enter__(self) -> "RunLog":
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for folder in (log_dir(), Path(os.environ.get("TMPDIR", "/tmp")) / "spear-logs"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{self.command}-{stamp}-{os.getpid()}.log"
                handler = logging.FileHandler(path, encoding="utf-8")
            except OSError:
                continue  # a read-only home: try the next folder
            self.path = path
            handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", self.secrets))
            self._add(handler)
            break
        if not self._logger.handlers or all(isinstance(h, logging.FileHandler) for h in self._logger.handlers):
            # with a handler of ours attached, logging's last-resort stderr output stops: keep warnings visible
            console = logging.StreamHandler(sys.stderr)
            console.setLevel(logging.INFO if self.verbose else logging.WARNING)
            console.setFormatter(_MaskingFormatter("%(message)s", self.secrets))
            self._add(console)
        if self._logger.level == logging.NOTSET or self._logger.level > logging.INFO:
            self._logger.setLevel(logging.INFO)
        try:
            ver = version("spear-pipeline")
        except PackageNotFoundError:
            ver = "unknown"
        shown = " ".join(f"{k}={v!r}" for k, v in self.options.items() if v not in (None, (), False))
        self._write(f"spear {self.command} (spear-pipeline {ver}, Python {sys.version.split()[0]}, pid {os.getpid()})\n"
                    f"working directory: {os.getcwd()}\noptions: {shown or '(none)'}\n")
        return self

    def _add(self, handler: logging.Handler) -> None:
        self._logger.addHandler(handler)
        self._handlers.append(handler)

    def _write(self, text: str) -> None:
        if self.path is None:
            return
        for h in self._handlers:
            if isinstance(h, logging.FileHandler):
                h.acquire()
                try:
                    h.stream.write(mask(text, self.secrets))
                    h.flush()
                finally:
                    h.release()

    def failure(self, exc: BaseException) -> Failure:
        """Record ``exc`` (full traceback to the file; to stderr too when verbose) and describe it."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        text, kind, root = describe_failure(exc, self.secrets)
        self._write(f"\n{time.strftime('%Y-%m-%d %H:%M:%S')} FAILED: {text}\n{tb}")
        if self.verbose:
            print(mask(tb, self.secrets), file=sys.stderr, end="", flush=True)
        line = text
        if kind == "unexpected":
            line += f" (full log: {self.path})" if self.path else " (no log file could be written)"
        return Failure(line=line, kind=kind, root=root, log_path=self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._write(f"\n{time.strftime('%Y-%m-%d %H:%M:%S')} finished\n")
        for h in self._handlers:
            self._logger.removeHandler(h)
            h.close()
        self._logger.setLevel(self._level)
        if self.path is not None:
            _prune(self.path.parent)


def _prune(folder: Path, keep: int = KEEP_LOGS) -> None:
    try:
        logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in logs[keep:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # another run pruning at the same time
