"""A `spear` command line made ready to run as a Ray Job: checked against the CLI, files and credentials moved.

:func:`build_submission` is the CLI half of ``spear submit``; :class:`spear.cluster.jobs.JobClient`
then stages and submits what it returns. It

- parses the command with the real CLI, so a command line the CLI would reject fails here, before
  anything reaches the cluster;
- rewrites every argument that names an existing local file (a config YAML, a labels manifest) to
  its path in the job's ``working_dir`` (``files/<name>``), and refuses a config that holds
  credentials;
- moves ``--set storage.access_key_id=...`` / ``--set storage.secret_access_key=...`` off the command
  line into job environment variables, beside the AWS variables of the submitting shell;
- adds ``--json`` where the command takes it, so the job's summary is its last JSON log line.

Example::

    from spear.pipeline.cli import main
    sub = build_submission(["spear", "decode", "my.yaml", "--output", "s3://b/out"], cli=main)
    sub.uploads        # {'/abs/my.yaml': 'files/my.yaml'}
    sub.entrypoint     # python -m spear.pipeline.cli decode --json files/my.yaml --output s3://b/out
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import click
import yaml

from spear.cluster.jobs import CLI_MODULE, JobError, JobState, Submission
from spear.cluster.storage import CREDENTIAL_VARS, secrets_in

#: Object-store settings forwarded alongside the credentials (not secret).
SETTING_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
#: ``--set`` keys whose values are credentials: they travel as these variables instead.
SECRET_SETTINGS = {"storage.access_key_id": "AWS_ACCESS_KEY_ID", "storage.secret_access_key": "AWS_SECRET_ACCESS_KEY",
                   "storage.session_token": "AWS_SESSION_TOKEN"}


def _strip_prefix(command: Sequence[str]) -> list[str]:
    cmd = list(command)
    if cmd and os.path.basename(cmd[0]) == "spear":
        return cmd[1:]
    for i in range(min(len(cmd), 3)):
        if cmd[i:i + 2] == ["-m", CLI_MODULE]:
            return cmd[i + 2:]
    return cmd


def resolve_command(cli: click.Group, command: Sequence[str]) -> tuple[list[str], click.Command, list[str]]:
    """(subcommand path, click command, its arguments) of a ``spear ...`` command line, following nested
    groups (``config show``); raises :class:`~spear.cluster.jobs.JobError` where there is no such command."""
    path: list[str] = []
    cmd: click.Command = cli
    rest = _strip_prefix([str(a) for a in command])
    while isinstance(cmd, click.Group):
        if not rest or rest[0].startswith("-"):
            raise JobError("no spear command to submit: give one after `--`, e.g. "
                           "spear submit --address http://HEAD:8265 -- spear tokenize ...")
        name = rest.pop(0)
        sub = cmd.get_command(click.Context(cmd), name)
        if sub is None:
            raise JobError(f"`spear {' '.join(path + [name])}` is not a spear command "
                           f"(see `spear --help`)")
        path.append(name)
        cmd = sub
    return path, cmd, rest


def _takes_json(cmd: click.Command) -> bool:
    return any("--json" in getattr(p, "opts", ()) for p in cmd.params)


def _check_config_file(path: str) -> None:
    """Refuse to upload a spear config that holds credentials (they travel as job env vars instead)."""
    if not path.endswith((".yaml", ".yml")):
        return
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return  # not ours to judge: the job's own validation reports it
    storage = data.get("storage") if isinstance(data, dict) else None
    if not isinstance(storage, dict):
        return
    bad = [k.split(".", 1)[1] for k in SECRET_SETTINGS if storage.get(k.split(".", 1)[1])]
    if bad:
        names = ", ".join(f"storage.{k}" for k in bad)
        env_names = "/".join(SECRET_SETTINGS[f"storage.{k}"] for k in bad)
        raise JobError(f"{path} holds {names}: a submitted job must not carry credentials in files. Remove "
                       f"{'it' if len(bad) == 1 else 'them'} and set {env_names} in this shell (spear submit "
                       f"forwards them as job environment variables), or give the cluster an IAM role")


def build_submission(command: Sequence[str], *, cli: click.Group, env: Mapping[str, str] = os.environ,
                     forward_credentials: bool = True, extra_env: Optional[Mapping[str, str]] = None,
                     python: str = "python") -> Submission:
    """Check a ``spear ...`` command line against ``cli`` (the `spear` command tree) and work out what the job needs.

    ``command`` may start with ``spear`` (or ``python -m spear.pipeline.cli``). ``--json`` is added
    when the command takes it. Raises :class:`~spear.cluster.jobs.JobError` for a command the CLI
    would reject. See the module docstring for an example.
    """
    raw = [str(a) for a in command]
    path, cmd, rest = resolve_command(cli, raw)
    if path[0] == "submit":
        raise JobError("`spear submit` cannot be submitted as a job")
    if not ({"-h", "--help"} & set(rest)):
        try:
            cmd.make_context(" ".join(["spear", *path]), list(rest), resilient_parsing=False)
        except click.exceptions.Exit:
            pass
        except click.ClickException as exc:
            raise JobError(f"spear {' '.join(path)}: {exc.format_message()}") from None

    sub = Submission(command=raw, args=[], python=python)
    if forward_credentials:
        sub.env_vars.update({k: env[k] for k in CREDENTIAL_VARS + SETTING_VARS if env.get(k)})
    sub.env_vars.update(extra_env or {})
    used_names: set[str] = set()

    def upload(local: str) -> str:
        local = os.path.abspath(local)
        if local in sub.uploads:
            return sub.uploads[local]
        _check_config_file(local)
        name = os.path.basename(local)
        n = 1
        while name in used_names:
            n += 1
            name = f"{n}-{os.path.basename(local)}"
        used_names.add(name)
        sub.uploads[local] = f"files/{name}"
        return sub.uploads[local]

    def value(v: str) -> str:
        if os.path.isfile(v):
            return upload(v)
        if os.path.isdir(v):
            sub.notes.append(f"{v} is a directory on this machine: the job sees the cluster nodes' disks "
                             "(use s3:// or a filesystem every node mounts)")
        return v

    def setting(kv: str) -> Optional[str]:
        """A ``--set key=value``: credentials move to env vars (None: drop the pair), file values upload."""
        key, sep, val = kv.partition("=")
        if sep and key.strip() in SECRET_SETTINGS:
            sub.env_vars[SECRET_SETTINGS[key.strip()]] = val
            return None
        if sep and os.path.isfile(val):
            return f"{key}={upload(val)}"
        return kv

    out: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--set" and i + 1 < len(rest):
            kv = setting(rest[i + 1])
            if kv is not None:
                out += ["--set", kv]
            i += 2
            continue
        if tok.startswith("--set="):
            kv = setting(tok[len("--set="):])
            if kv is not None:
                out.append(f"--set={kv}")
        elif tok.startswith("--") and "=" in tok:
            opt, _, v = tok.partition("=")
            out.append(f"{opt}={value(v)}")
        elif tok.startswith("-") and tok != "-":
            out.append(tok)
        else:
            out.append(value(tok))
        i += 1

    if _takes_json(cmd) and "--json" not in out:
        out.insert(0, "--json")
    sub.args = path + out
    sub.secrets = [v for k, v in sub.env_vars.items() if k in CREDENTIAL_VARS and v] + secrets_in(env)
    return sub


def follow_hints(state: JobState) -> str:
    """The commands that follow, inspect and stop a submitted job (printed while it still runs)."""
    a = shlex.quote(state.address)
    return (f"  follow: spear logs --address {a} --follow {state.job_id}\n"
            f"  status: spear status --address {a} {state.job_id}\n"
            f"  stop:   spear stop --address {a} {state.job_id}")


@dataclass
class SubmittedJob:
    """``spear submit``'s result: the job's state, told with how to follow it while it still runs.

    Example::

        >>> state = JobState(job_id="raysubmit_1", status="PENDING", address="http://head:8265")
        >>> print(SubmittedJob(state).human().splitlines()[1])
          follow: spear logs --address http://head:8265 --follow raysubmit_1
    """

    state: JobState

    @property
    def succeeded(self) -> bool:
        return self.state.succeeded

    def to_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def human(self) -> str:
        return self.state.human() + ("" if self.state.terminal else "\n" + follow_hints(self.state))
