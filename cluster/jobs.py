"""Run `spear` commands on a Ray cluster as Ray Jobs (the Jobs API on the head's dashboard port, 8265).

A :class:`Submission` (built from a ``spear`` command line by :mod:`spear.pipeline.submission`)
carries everything the command needs that is not already on the cluster:

- this package, as a ``py_modules`` entry (a staged ``spear/`` folder with the package folders only:
  no ``.venv``, ``.git``, tests or caches), so the job runs the code that submitted it even where an
  older ``spear`` is installed; the cluster's Python environment supplies the dependencies;
- every command-line argument that names an existing local file (a config YAML, a labels manifest),
  uploaded in the job's ``working_dir`` under ``files/`` and the argument rewritten to that path;
- object-store settings and credentials as environment variables of the job (``runtime_env.env_vars``):
  the AWS variables set in the submitting shell, and ``--set storage.access_key_id=...`` /
  ``--set storage.secret_access_key=...``, which are moved off the command line into those variables.
  They never enter the uploaded files or the entrypoint, and every printed text is masked.

The entrypoint is ``python -m spear.pipeline.cli <command> --json ...``: it needs no ``spear`` script on
the cluster's PATH, and the job's own JSON summary is the last log line that parses as a JSON object.
The job's process runs the CLI module by name: this module never imports it (cluster sits below pipeline).

Example::

    from spear.cluster.jobs import JobClient
    from spear.pipeline.cli import main
    from spear.pipeline.submission import build_submission
    client = JobClient("http://head:8265")
    job = client.submit(build_submission(["spear", "tokenize", "--input", "s3://b/speech", "--domain", "speech",
                                          "--output", "s3://b/tokens"], cli=main))
    final = client.wait(job.job_id, log_stream=sys.stderr)
    print(final.status, final.summary)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, TextIO

from spear.cluster.ray_runtime import RayConnectionError
# Credentials are masked in everything printed, with the project's one masking helper.
from spear.cluster.storage import mask, secrets_in

#: The module a job's entrypoint runs (``python -m``), named here and imported only in the job's process.
CLI_MODULE = "spear.pipeline.cli"
#: The top-level folders of the package (pyproject's ``spear.*`` packages), shipped as ``spear.<part>``.
PACKAGE_PARTS = ("pipeline", "evaluation", "synthetic", "stages", "config", "cluster", "models", "schemas")
#: Ray stores uploads in the GCS (gRPC messages of at most 512 MiB, a warning from 256 MiB); big
#: inputs belong on object storage, so a submission stays far below that.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".git", ".venv", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info", ".so.tmp")


class JobError(RuntimeError):
    """A submission or job request that cannot be done as asked; the message is meant for the user."""


# --------------------------------------------------------------------------- addresses, masking, summaries


def resolve_address(address: Optional[str] = None, env: Mapping[str, str] = os.environ) -> str:
    """The Jobs API address: ``address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS.

    The http:// form (``http://HEAD:8265``) talks to the dashboard directly; a GCS address
    (``HEAD:6379``, ``auto``) works too when this machine can reach the cluster's GCS.
    """
    found = address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS")
    if not found:
        raise JobError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return found.rstrip("/")


@contextlib.contextmanager
def _only_this_address() -> Iterator[None]:
    """Ray's JobSubmissionClient takes RAY_API_SERVER_ADDRESS, then RAY_ADDRESS over the address it is
    given (ray.dashboard.utils.get_address_for_submission_client): on a machine with RAY_ADDRESS set (a
    cluster node, a Ray job's driver) `--address http://other:8265` would reach the local cluster while
    spear said "other". The client is built without them; :func:`resolve_address` has already used them."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def last_error_line(text: str) -> Optional[str]:
    """The last ``error: ...`` line of a job's log (how a failed spear command says why), with the
    indented lines that follow it (a config error's fields), or None."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            block = [lines[i].rstrip()]
            for ln in lines[i + 1:i + 21]:
                if not ln.startswith("  "):
                    break
                block.append(ln.rstrip())
            return "\n".join(block)
    return None


def last_json_object(text: str) -> Optional[dict]:
    """The last line of ``text`` that parses as a JSON object (a job's ``--json`` summary), or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


# --------------------------------------------------------------------------- building a submission


@dataclass
class Submission:
    """What will be submitted for one command line (built without touching the cluster, by
    :func:`spear.pipeline.submission.build_submission`).

    ``args`` are the arguments after ``python -m spear.pipeline.cli`` as the job sees them;
    ``uploads`` maps local files to their path inside the job's working dir; ``env_vars`` hold
    credentials (never print them: use ``display_entrypoint`` and ``to_dict()``).
    """

    command: list[str]
    args: list[str]
    python: str = "python"
    uploads: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict, repr=False)
    secrets: list[str] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def entrypoint(self) -> str:
        return shlex.join([self.python, "-m", CLI_MODULE, *self.args])

    @property
    def display_entrypoint(self) -> str:
        return mask(self.entrypoint, self.secrets)

    def to_dict(self) -> dict[str, Any]:
        """Printable description: entrypoint, uploads, and the *names* of the forwarded variables."""
        return {"command": [mask(a, self.secrets) for a in self.command], "entrypoint": self.display_entrypoint, "uploads": dict(self.uploads),
                "env_vars": sorted(self.env_vars), "notes": list(self.notes)}


def package_dirs() -> dict[str, str]:
    """``{part: local folder}`` of the installed package (the repo folders for an editable install)."""
    dirs = {}
    for part in PACKAGE_PARTS:
        spec = importlib.util.find_spec(f"spear.{part}")
        if spec is None or not spec.submodule_search_locations:
            raise JobError(f"spear.{part} is not importable here: cannot ship the package")
        dirs[part] = list(spec.submodule_search_locations)[0]
    return dirs


def _copy_tree(src: str, dst: str) -> int:
    """Copy a package folder without caches or build leftovers; returns bytes copied."""
    total = 0
    for root, dirnames, files in os.walk(src):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_NAMES and not d.endswith(_SKIP_SUFFIXES)]
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            if f.endswith(_SKIP_SUFFIXES):
                continue
            shutil.copy2(os.path.join(root, f), os.path.join(dst, rel, f))
            total += os.path.getsize(os.path.join(root, f))
    return total


def stage_runtime_env(sub: Submission, staging_dir: str, *, ship_package: bool = True) -> dict[str, Any]:
    """Lay out the working dir (uploaded files) and the package copy under ``staging_dir``; the runtime_env.

    The returned dict holds credentials (``env_vars``): hand it to Ray, never print it.
    """
    wd = os.path.join(staging_dir, "working_dir")
    os.makedirs(os.path.join(wd, "files"), exist_ok=True)
    total = 0
    for local, inside in sub.uploads.items():
        shutil.copy2(local, os.path.join(wd, inside))
        total += os.path.getsize(local)
    # A small record of the submission, so the working dir is never empty and a job explains itself.
    Path(wd, "spear-submission.json").write_text(json.dumps(sub.to_dict(), indent=1))
    runtime_env: dict[str, Any] = {"working_dir": wd, "env_vars": dict(sub.env_vars)}
    if ship_package:
        pkg = os.path.join(staging_dir, "package", "spear")
        for part, src in package_dirs().items():
            total += _copy_tree(src, os.path.join(pkg, part))
        runtime_env["py_modules"] = [pkg]
    if total > MAX_UPLOAD_BYTES:
        big = sorted(sub.uploads, key=os.path.getsize, reverse=True)[:3]
        raise JobError(f"the submission would upload {total / 2**20:.0f} MiB (limit {MAX_UPLOAD_BYTES / 2**20:.0f} MiB); "
                       f"put large inputs on object storage and pass their s3:// URIs"
                       + (f" (largest: {', '.join(big)})" if big else ""))
    return runtime_env


# --------------------------------------------------------------------------- job state


@dataclass
class JobState:
    """One job as the cluster reports it (entrypoint and message masked)."""

    job_id: str
    status: str
    address: str
    message: str = ""
    entrypoint: str = ""
    start_time: Optional[float] = None     # seconds since the epoch
    end_time: Optional[float] = None
    summary: Optional[dict] = None         # the job's own --json summary, once it has finished
    error: Optional[str] = None            # the failed job's own `error: ...` line (its root cause)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        took = ""
        if self.start_time and self.end_time:
            took = f" after {self.end_time - self.start_time:.1f} s"
        lines = [f"{self.job_id}: {self.status}{took}"]
        if self.entrypoint:
            lines.append(f"  command: {self.entrypoint}")
        if self.error:  # the job said what went wrong in one line: Ray's message (a log tail) adds nothing
            lines += ["  " + ln for ln in self.error.splitlines()]
            lines.append(f"  full log: spear logs --address {shlex.quote(self.address)} {self.job_id}")
        elif self.message:
            msg = self.message.strip().splitlines()
            lines.append("  message: " + msg[0])
            lines += ["    " + m for m in msg[1:]]
        if self.summary is not None:
            lines.append("  summary: " + json.dumps(self.summary, default=str))
        return "\n".join(lines)


@dataclass
class JobList:
    address: str
    jobs: list[JobState]

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "jobs": [j.to_dict() for j in self.jobs]}

    def human(self) -> str:
        if not self.jobs:
            return f"no submitted jobs on {self.address}"
        rows = [("JOB", "STATUS", "STARTED", "COMMAND")]
        for j in self.jobs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time)) if j.start_time else "-"
            command = j.entrypoint.replace(f"python -m {CLI_MODULE}", "spear", 1)
            rows.append((j.job_id, j.status, started, command if len(command) <= 100 else command[:97] + "..."))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


# --------------------------------------------------------------------------- the client


class JobClient:
    """Submit, follow, list and stop spear jobs on one cluster (``ray.job_submission.JobSubmissionClient``).

    ``secrets`` are masked in every text this client returns (default: the credentials of this shell).
    """

    def __init__(self, address: Optional[str] = None, *, secrets: Optional[Sequence[str]] = None):
        self.address = resolve_address(address)
        self.secrets = list(secrets) if secrets is not None else secrets_in()
        self._sdk: Any = None

    @property
    def _client(self) -> Any:
        """The SDK client, connected on first use (so a bad submission fails before any network call)."""
        if self._sdk is None:
            from ray.job_submission import JobSubmissionClient

            try:
                with _only_this_address():
                    self._sdk = JobSubmissionClient(self.address)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, requests errors, GCS lookups: one clear line
                raise RayConnectionError(f"cannot reach the Ray Jobs API at {self.address}: {exc}") from None
        return self._sdk

    # ----------------------------------------------------------------- helpers

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "does not exist" in text or "404" in text:
                raise JobError(f"no job {args[0] if args else ''} on {self.address}") from None
            if isinstance(exc, (ConnectionError, OSError)) or "Connection" in type(exc).__name__:
                raise RayConnectionError(f"cannot reach the Ray Jobs API at {self.address}: {text}") from None
            raise JobError(f"{what} failed on {self.address}: {mask(text, self.secrets)}") from None

    def _state(self, info: Any, job_id: Optional[str] = None) -> JobState:
        def seconds(ms: Any) -> Optional[float]:
            return ms / 1000.0 if ms else None

        return JobState(job_id=job_id or getattr(info, "submission_id", None) or info.job_id,
                        status=str(info.status), address=self.address,
                        message=mask(info.message or "", self.secrets),
                        entrypoint=mask(info.entrypoint or "", self.secrets),
                        start_time=seconds(info.start_time), end_time=seconds(info.end_time))

    # ----------------------------------------------------------------- submit

    def submit(self, sub: Submission, *, job_id: Optional[str] = None, ship_package: bool = True,
               entrypoint_num_cpus: Optional[float] = None, entrypoint_num_gpus: Optional[float] = None,
               notes: Optional[TextIO] = None) -> JobState:
        """Stage and submit one command (:func:`spear.pipeline.submission.build_submission`); returns at once (PENDING)."""
        self.secrets = sorted(set(self.secrets) | set(sub.secrets))
        for note in sub.notes:
            print(f"note: {note}", file=notes or sys.stderr)
        with tempfile.TemporaryDirectory(prefix="spear-submit-") as staging:
            runtime_env = stage_runtime_env(sub, staging, ship_package=ship_package)
            kwargs: dict[str, Any] = {}
            if entrypoint_num_cpus is not None:
                kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
            if entrypoint_num_gpus is not None:
                kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
            submitted = self._call("submitting the job", self._client.submit_job, entrypoint=sub.entrypoint,
                                   runtime_env=runtime_env, submission_id=job_id,
                                   metadata={"spear_command": " ".join(sub.args[:2])}, **kwargs)
        return JobState(job_id=submitted, status="PENDING", address=self.address, entrypoint=sub.display_entrypoint)

    # ----------------------------------------------------------------- queries

    def status(self, job_id: str, *, with_summary: bool = True) -> JobState:
        """Status and message of one job; ``summary`` is read from the logs once it has finished."""
        state = self._state(self._call("reading the job status", self._client.get_job_info, job_id), job_id)
        if with_summary and state.terminal:
            text = self.logs(job_id)
            state.summary = last_json_object(text)
            state.error = None if state.succeeded else last_error_line(text)
        return state

    def list(self) -> JobList:
        """Submitted jobs (not drivers connected directly), newest first."""
        jobs = [self._state(j) for j in self._call("listing jobs", self._client.list_jobs)
                if getattr(j, "submission_id", None)]
        jobs.sort(key=lambda j: j.start_time or 0.0, reverse=True)
        return JobList(address=self.address, jobs=jobs)

    def logs(self, job_id: str) -> str:
        """The job's whole log so far (driver stdout + stderr), secrets masked."""
        return mask(self._call("reading the job logs", self._client.get_job_logs, job_id), self.secrets)

    def follow(self, job_id: str, stream: TextIO) -> None:
        """Write the job's log to ``stream`` as it grows, until the job ends (masked line by line)."""
        async def tail() -> None:
            pending = ""
            async for chunk in self._client.tail_job_logs(job_id):
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    stream.write(mask(line, self.secrets) + "\n")
                stream.flush()
            if pending:
                stream.write(mask(pending, self.secrets) + "\n")
                stream.flush()

        self.status(job_id, with_summary=False)  # a clear error for an unknown job, before the websocket
        try:
            asyncio.run(tail())
        except (KeyboardInterrupt, JobError):
            raise
        except Exception as exc:  # noqa: BLE001 - a dropped websocket: fall back to polling the whole log
            print(f"(log stream interrupted: {type(exc).__name__}; polling)", file=stream)
            shown = 0
            while True:
                state = self.status(job_id, with_summary=False)
                text = self.logs(job_id)
                stream.write(text[shown:])
                stream.flush()
                shown = len(text)
                if state.terminal:
                    return
                time.sleep(2.0)

    def wait(self, job_id: str, *, log_stream: Optional[TextIO] = None, poll_s: float = 1.0,
             timeout_s: Optional[float] = None) -> JobState:
        """Block until the job is SUCCEEDED, FAILED or STOPPED (streaming its log to ``log_stream``)."""
        if log_stream is not None:
            self.follow(job_id, log_stream)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.status(job_id, with_summary=False)
            if state.terminal:
                text = self.logs(job_id)
                state.summary = last_json_object(text)
                state.error = None if state.succeeded else last_error_line(text)
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {job_id} is still {state.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def stop(self, job_id: str, *, wait: bool = True, timeout_s: float = 60.0) -> JobState:
        """Ask the cluster to stop the job (SIGTERM to its driver, SIGKILL after Ray's grace period)."""
        self._call("stopping the job", self._client.stop_job, job_id)
        if not wait:
            return self.status(job_id, with_summary=False)
        return self.wait(job_id, timeout_s=timeout_s, poll_s=0.5)
