"""Failures as a user sees them: one `error:` line with the root cause and the log's path, the
traceback in that log (and on stderr only with --verbose), secrets masked on every path, and storage
that cannot be reached reported at once. The CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spear.config import secret_fields
from spear.pipeline.cli import main as cli
from spear.pipeline.submission import SECRET_SETTINGS, build_submission
from support.configs import closed_port

SECRET_FIELDS = ["storage.access_key_id", "storage.secret_access_key", "storage.session_token"]


def spear(*args, env=None, cwd=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture
def log_env(tmp_path):
    return {"SPEAR_LOG_DIR": str(tmp_path / "logs")}


@pytest.fixture
def broken_checkpoint(tmp_path) -> str:
    """A checkpoint folder whose train state cannot be read: `spear export` fails unexpectedly."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "train_state.json").write_text("{ not json")
    return str(ck)


def _log_path(stderr: str) -> Path:
    m = re.search(r"\(full log: (.+)\)$", error_lines(stderr)[-1])
    assert m, stderr
    return Path(m.group(1))


# --------------------------------------------------------------------------- one line, the cause, the log


def test_an_unexpected_failure_is_one_error_line_and_its_log_holds_the_traceback(broken_checkpoint, tmp_path, log_env):
    r = spear("export", broken_checkpoint, "--output", str(tmp_path / "exp"), env=log_env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert r.stderr.strip().splitlines()[-1] == line  # the last thing printed
    assert "JSONDecodeError" in line  # the cause, named
    log = _log_path(r.stderr)
    assert log.parent == tmp_path / "logs" and log.name.startswith("export-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "JSONDecodeError" in text
    assert broken_checkpoint in text  # the options of the run


@pytest.mark.parametrize("where", ["group", "command"])
def test_verbose_prints_the_traceback_too(broken_checkpoint, tmp_path, log_env, where):
    args = ["export", broken_checkpoint, "--output", str(tmp_path / "exp")]
    args = ["--verbose", *args] if where == "group" else [*args, "--verbose"]
    r = spear(*args, env=log_env)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "JSONDecodeError" in r.stderr
    (line,) = error_lines(r.stderr)
    assert r.stderr.strip().splitlines()[-1] == line and _log_path(r.stderr).is_file()


def test_known_errors_keep_their_one_line(tmp_path, log_env):
    r = spear("export", str(tmp_path / "nothing-here"), "--output", str(tmp_path / "exp"), env=log_env)
    assert r.returncode == 2  # a config-like error: the input names no checkpoint
    (line,) = error_lines(r.stderr)
    assert "full log" not in line and "Traceback" not in r.stderr
    with closed_port() as port:
        r = spear("decode", "--input", "s3://bucket/x", "--domain", "speech", "--output", str(tmp_path / "o"),
                  env=dict(log_env, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                           AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"))
    assert r.returncode == 1
    (line,) = error_lines(r.stderr)
    assert "cannot reach storage" in line and "full log" not in line and "Traceback" not in r.stderr
    r = spear("evaluate", "--corpus", str(tmp_path), "--output", str(tmp_path / "ev"), "--probe-tokens", env=log_env)
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert "--probe-tokens needs --tokens-output" in line and "Traceback" not in r.stderr


def test_ray_wrappers_are_unwrapped_to_the_root_cause(ray_cluster):
    """A task's exception reaches the driver as a RayTaskError, a training worker's inside Ray Train's
    WorkerGroupError: the line names the root cause (and the rank), not the wrapper."""
    import ray
    from ray.train import ControllerError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from spear.cluster.storage import StorageError
    from spear.pipeline.run_log import describe_failure

    @ray.remote(max_retries=0)
    def fails(kind: str):
        if kind == "missing":
            raise FileNotFoundError("shard-00003.parquet is missing")
        raise StorageError("cannot reach storage for s3://b/x at http://h:1: connection refused")

    with pytest.raises(Exception) as missing:
        ray.get(fails.remote("missing"))
    with pytest.raises(Exception) as storage:
        ray.get(fails.remote("storage"))
    assert isinstance(missing.value, ray.exceptions.RayTaskError)

    text, kind, root = describe_failure(missing.value)
    assert (text, kind) == ("FileNotFoundError: shard-00003.parquet is missing", "unexpected")
    assert isinstance(root, FileNotFoundError)
    text, kind, _ = describe_failure(WorkerGroupError("rank 1 failed", {1: missing.value}))
    assert text == "training worker rank 1: FileNotFoundError: shard-00003.parquet is missing"
    text, kind, _ = describe_failure(ControllerError(storage.value))
    assert kind == "known" and text.startswith("cannot reach storage for s3://b/x")


# --------------------------------------------------------------------------- secrets


def test_every_secret_field_is_known_to_masking_and_to_job_submission():
    assert sorted(secret_fields()) == sorted(SECRET_FIELDS) == sorted(SECRET_SETTINGS)


@pytest.mark.parametrize("field", SECRET_FIELDS)
def test_a_secret_is_never_echoed(field, tmp_path, log_env, broken_checkpoint):
    secret = f"TOPSECRET-{field.rsplit('.', 1)[-1]}-42"
    seen: list[str] = []

    # config show
    r = spear("config", "show", "--set", f"{field}={secret}", env=log_env)
    assert r.returncode == 0, r.stderr
    section, name = field.split(".")
    assert yaml.safe_load(r.stdout)[section][name] == "***"
    seen += [r.stdout, r.stderr]

    # config errors: another field wrong, the secret field itself wrong, a file that does not parse
    r = spear("config", "show", "--set", "storage.retries=x", "--set", f"{field}={secret}", env=log_env)
    assert r.returncode == 2 and "storage.retries: must be a whole number (given: 'x')" in r.stderr
    seen += [r.stdout, r.stderr]
    r = spear("config", "show", "--set", f"{field}=[{secret}, 2]", env=log_env)
    assert r.returncode == 2 and f"{field}: must be text" in r.stderr
    seen += [r.stdout, r.stderr]
    r = spear("config", "show", "--set", f"storage={{{name}: {secret}, retries: x}}", env=log_env)
    assert r.returncode == 2 and "storage.retries" in r.stderr
    seen += [r.stdout, r.stderr]
    r = spear("config", "show", "--set", f"{field}=[{secret}", env=log_env)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    seen += [r.stdout, r.stderr]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"storage:\n  {name}: {secret}\n  retries: [1\n")
    r = spear("config", "show", str(bad), env=log_env)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    seen += [r.stdout, r.stderr]
    bad.write_text(f"storage:\n  {name}: {secret}\n  retries: x\n")
    r = spear("config", "show", str(bad), env=log_env)
    assert r.returncode == 2 and "storage.retries" in r.stderr
    seen += [r.stdout, r.stderr]

    # a --json summary
    r = spear("plan", "--json", "--hours", "10", "--set", f"{field}={secret}", env=log_env)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    seen += [r.stdout, r.stderr]

    # a failing job: its error line and its log file
    r = spear("export", broken_checkpoint, "--output", str(tmp_path / "exp"), "--json", "--set", f"{field}={secret}",
              env=log_env)
    assert r.returncode == 1
    log = _log_path(r.stderr).read_text()
    assert f"{field}=***" in log
    seen += [r.stdout, r.stderr, log]
    seen += [p.read_text() for p in (tmp_path / "logs").glob("*.log")]

    # a submitted job: the secret travels as an environment variable, never printed
    sub = build_submission(["spear", "tokenize", "--input", "s3://b/speech", "--domain", "speech",
                            "--output", "s3://b/t", "--set", f"{field}={secret}"], env={}, cli=cli)
    assert sub.env_vars[SECRET_SETTINGS[field]] == secret
    seen += [json.dumps(sub.to_dict()), sub.entrypoint, sub.display_entrypoint]
    no_ray = dict(log_env, RAY_ADDRESS="", RAY_API_SERVER_ADDRESS="")  # Ray's client prefers RAY_ADDRESS to --address
    r = spear("submit", "--address", "http://no-such-host.invalid:8265", "--", "spear", "decode", "--output",
              "s3://b/segments", "--set", f"{field}={secret}", env=no_ray)
    assert r.returncode == 1 and "cannot reach the Ray Jobs API" in r.stderr, r.stderr
    seen += [r.stdout, r.stderr]
    r = spear("submit", "--address", "http://no-such-host.invalid:8265", "--env", f"{SECRET_SETTINGS[field]}={secret}",
              "--", "spear", "decode", "--output", "s3://b/segments", f"--set={field}={secret}", env=no_ray)
    assert r.returncode == 1 and "cannot reach the Ray Jobs API" in r.stderr, r.stderr
    seen += [r.stdout, r.stderr]
    # spear submit's own check of the command, before submitting: a relative output, then an invalid setting
    r = spear("submit", "--address", "http://no-such-host.invalid:8265", "--", "spear", "decode",
              f"--set={field}={secret}", env=no_ray)
    assert r.returncode == 2 and "output 'spear-output' is a relative path" in r.stderr, r.stderr
    seen += [r.stdout, r.stderr]
    r = spear("submit", "--address", "http://no-such-host.invalid:8265", "--", "spear", "decode", "--output",
              "s3://b/segments", "--set", "storage.retries=x", "--set", f"{field}={secret}", env=no_ray)
    assert r.returncode == 2 and "storage.retries: must be a whole number" in r.stderr, r.stderr
    seen += [r.stdout, r.stderr]
    seen += [p.read_text() for p in (tmp_path / "logs").glob("*.log")]  # every run's log, the submissions' too

    leaks = [s for s in seen if secret in s]
    assert not leaks


# --------------------------------------------------------------------------- outputs of a submitted job


RELATIVE_OUTPUTS = [
    (["decode", "--input", "s3://b/x", "--domain", "speech"], "output 'spear-output'"),   # the config's default
    (["tokenize", "--input", "s3://b/x", "--domain", "speech", "--output", "tokens"], "output 'tokens'"),
    (["train", "--shards", "s3://b/t", "--set", "output=student"], "output 'student'"),
    (["demo", "--size", "tiny"], "--workdir 'spear-demo'"),
    (["export", "s3://b/student", "--output", "export"], "--output 'export'"),
    (["export-tokens", "s3://b/tokens", "cuts"], "DEST 'cuts'"),
]


@pytest.mark.parametrize("args, what", RELATIVE_OUTPUTS)
def test_a_submitted_job_refuses_a_relative_output(args, what, log_env):
    """Inside a Ray job (the variable Ray's job supervisor sets) a relative output would be written into the
    job's temporary working directory: one line, exit 2, before anything starts."""
    r = spear(*args, env=dict(log_env, RAY_JOB_CONFIG_JSON_ENV_VAR="{}"))
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: {what} is a relative path: a submitted job runs in a temporary working "), line


@pytest.mark.parametrize("args, what", RELATIVE_OUTPUTS)
def test_spear_submit_refuses_a_relative_output_before_it_submits(args, what, log_env):
    """`spear submit` runs the command's own checks as far as its destination, here: the address is never
    reached (nothing listens there), so the line comes before any submission."""
    r = spear("submit", "--address", "http://127.0.0.1:9", "--", "spear", *args, env=log_env)
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: {what} is a relative path: a submitted job runs in a temporary working "), line


def test_spear_submit_checks_the_config_first_and_lets_absolute_outputs_through(tmp_path, log_env):
    """A bad setting fails before submitting too; with an absolute or ~ output the check passes and the
    submission goes on (to the unreachable address). Commands that write nothing are not run here."""
    submit = ("submit", "--address", "http://127.0.0.1:9", "--", "spear")
    r = spear(*submit, "train", "--shards", "s3://b/t", "--output", str(tmp_path), "--set", "train.max_steps=0",
              env=log_env)
    assert r.returncode == 2 and "train.max_steps: must be at least 1" in r.stderr, r.stderr
    for args in (("train", "--shards", "s3://b/t", "--output", str(tmp_path / "student")),
                 ("demo", "--workdir", "~/spear-demo"), ("status", "s3://b/tokens")):
        r = spear(*submit, *args, env=log_env, cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        (line,) = error_lines(r.stderr)
        assert line.startswith("error: cannot reach the Ray Jobs API at http://127.0.0.1:9"), line
    assert set(os.listdir(tmp_path)) <= {"logs"}  # (the run logs of log_env); no student folder


def test_every_command_that_writes_is_checked_by_spear_submit():
    """`spear submit` runs a command only as far as its `_destination` call, and only when it is marked as
    writing: a command that checks a destination must be marked (or submit would not check it), and a marked
    one must check it before anything else (or submit would run it here)."""
    import ast
    import inspect
    import textwrap

    from spear.pipeline import cli

    def commands(group):
        for cmd in group.commands.values():
            yield from commands(cmd) if hasattr(cmd, "commands") else [cmd]

    checked = {}
    for cmd in commands(cli.main):
        body = ast.parse(textwrap.dedent(inspect.getsource(cmd.callback))).body[0].body
        calls = [i for i, stmt in enumerate(body) for node in ast.walk(stmt)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_destination"]
        heavy = [i for i, stmt in enumerate(body) for node in ast.walk(stmt)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("_run_job", "_jobs", "Storage")]
        assert getattr(cmd.callback, "__spear_writes__", False) == bool(calls), cmd.name
        if calls:
            assert len(calls) == 1 and all(calls[0] < i for i in heavy), cmd.name
            checked[cmd.name] = calls[0]
    assert len(checked) == 10, sorted(checked)


def test_outside_a_job_or_with_an_absolute_path_a_relative_output_is_fine(tmp_path, log_env):
    """The same check lets absolute and ~ paths through in a job, and relative ones outside a job: the command
    gets as far as its own error (no checkpoint there)."""
    for env, out in (({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, str(tmp_path / "abs")), ({}, "export")):
        r = spear("export", str(tmp_path / "none"), "--output", out, env=dict(log_env, **env), cwd=tmp_path)
        assert "relative path" not in r.stderr and "neither a training checkpoint" in r.stderr, r.stderr


# --------------------------------------------------------------------------- workers and config wording


@pytest.mark.parametrize("value", ["2:4", '"2:4"', "[2, 4]", "3"])
def test_train_workers_flag_takes_every_form(value, log_env):
    r = spear("train", "--workers", value, env=log_env)  # no --shards: fails after the options were read
    assert r.returncode == 2 and "no token dataset to train on" in r.stderr, r.stderr
    assert "--workers" not in r.stderr


def test_train_workers_flag_says_what_it_expects(log_env):
    r = spear("train", "--workers", "two", env=log_env)
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert line == "error: --workers 'two': expected a number of workers N (such as 3) or MIN:MAX for an elastic " \
                   "run (such as 2:4 or [2, 4])"


@pytest.mark.parametrize("args, line", [
    (("train", "--shards", "a", "--max-steps", "3", "--shards", "b"), "error: --shards was given 2 times"),
    (("tokenize", "--output=out-a", "--input", "x", "--domain", "speech", "--output", "out-b"),
     "error: --output was given 2 times"),
    (("s3", "serve", "--dir", "d", "--port", "1", "--port", "2"), "error: --port was given 2 times"),
])
def test_a_single_valued_option_given_twice_is_one_error_line(args, line, tmp_path, log_env):
    """click keeps the last of a repeated option: a user's first --output or --shards would be dropped
    without a word. It is refused before anything runs (nothing is written in the working directory)."""
    r = spear(*args, env=log_env, cwd=tmp_path)
    assert r.returncode == 2
    (err,) = error_lines(r.stderr)
    assert err.startswith(line) and "give it once" in err
    assert list(tmp_path.iterdir()) == []


def test_repeatable_options_and_a_submitted_commands_own_options_are_not_counted(log_env):
    # --set and --manifest repeat by design; the job's own --address after COMMAND is the job's, not submit's
    r = spear("evaluate", "--manifest", "a.txt", "--manifest", "b.txt", "--output", "o", "--set", "x.y=1",
              "--set", "x.z=2", env=log_env)
    assert r.returncode == 2 and "given 2 times" not in r.stderr
    r = spear("submit", "--address", "http://no-such-host.invalid:8265", "spear", "tokenize", "--address", "ray://x:1",
              "--output", "s3://b/tokens",
              env=log_env)
    assert r.returncode != 0 and "given 2 times" not in r.stderr and "cannot reach the Ray Jobs API" in r.stderr


# --------------------------------------------------------------------------- unreachable storage


@pytest.mark.parametrize("endpoint, why", [("closed", "connection refused"),
                                           ("http://no-such-host.invalid:8333", "does not resolve")])
def test_unreachable_storage_is_reported_at_once_with_default_retries(endpoint, why, tmp_path, log_env):
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}" if endpoint == "closed" else endpoint
        env = dict(log_env, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL=url)
        start = time.monotonic()
        r = spear("decode", "--input", "s3://bucket/x", "--domain", "speech", "--output", str(tmp_path / "o"),
                  env=env, timeout=120)
        took = time.monotonic() - start
    assert r.returncode == 1
    (line,) = error_lines(r.stderr)
    assert "cannot reach storage" in line and why in line and url in line
    assert took < 30  # a guard against retrying for minutes, not a benchmark


# --------------------------------------------------------------------------- submitted jobs


def test_a_submitted_job_logs_its_traceback_and_the_client_shows_its_error_line(broken_checkpoint, tmp_path, log_env):
    # the driver of a Ray Job: Ray's job supervisor sets this variable; the job's stderr is its log
    r = spear("export", broken_checkpoint, "--output", str(tmp_path / "exp"), "--json",
              env=dict(log_env, RAY_JOB_CONFIG_JSON_ENV_VAR="{}"))
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    (line,) = error_lines(r.stderr)

    from spear.cluster.jobs import JobState, last_error_line

    job_log = "starting\n" + r.stderr
    assert last_error_line(job_log) == line
    state = JobState(job_id="raysubmit_x", status="FAILED", address="http://head:8265",
                     message="Job entrypoint command failed with exit code 1, last available logs:\n" + r.stderr,
                     error=last_error_line(job_log))
    shown = state.human()
    assert line in shown and "spear logs --address http://head:8265 raysubmit_x" in shown
    assert "Traceback" not in shown
    config_log = "error: invalid config files/bad.yaml:\n  decode.max_segment_seconds: must be a valid number\nbye\n"
    assert last_error_line(config_log) == config_log.rsplit("\n", 2)[0]
