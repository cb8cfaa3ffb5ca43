"""Ray Jobs for spear commands: what a submission carries, and a real two-node cluster running them.

The fast tests check the submission that `spear submit` builds (against the real CLI); the slow
ones start a head and a worker node with `ray start` (private temp dirs, explicit ports, 1 CPU each,
no AWS credentials in their environment) and drive them with the `spear` CLI as a user would, with
SeaweedFS as the object store whose credentials travel only with the job.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from spear.cluster.jobs import (MAX_UPLOAD_BYTES, JobClient, JobError, last_json_object, resolve_address,
                                stage_runtime_env)
from spear.cluster.local_s3 import free_port
from spear.cluster.storage import CREDENTIAL_VARS, Storage, join_uri, mask, resolve_uri
from spear.pipeline.cli import main as cli
from spear.pipeline.submission import build_submission

SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE123", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-example-secret",
              "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}


def spear(*args, env=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


# --------------------------------------------------------------------------- the submission (no cluster)


def test_submission_runs_the_module_entrypoint_with_json_and_uploads_named_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("decode:\n  max_segment_seconds: 5\n")
    labels = tmp_path / "sub" / "run.yaml"  # same base name, another file
    labels.parent.mkdir()
    labels.write_text("x: 1\n")
    (tmp_path / "speech").mkdir()  # a local directory argument stays as is, with a note
    sub = build_submission(["spear", "decode", str(cfg), "--input", "speech", "--domain", "speech",
                            "--output=s3://b/out", "--set", f"teachers.speech.path={labels}"], env={}, cli=cli)
    assert sub.args[:2] == ["decode", "--json"]
    assert sub.uploads == {str(cfg): "files/run.yaml", str(labels): "files/2-run.yaml"}
    assert sub.args[2] == "files/run.yaml" and "--output=s3://b/out" in sub.args
    assert "teachers.speech.path=files/2-run.yaml" in sub.args
    assert sub.entrypoint.startswith("python -m spear.pipeline.cli decode --json files/run.yaml --input speech ")
    assert any("speech is a directory on this machine" in n for n in sub.notes)

    staged = stage_runtime_env(sub, str(tmp_path / "stage"))
    wd = Path(staged["working_dir"])
    assert (wd / "files" / "run.yaml").read_text() == cfg.read_text()
    assert (wd / "files" / "2-run.yaml").read_text() == "x: 1\n"
    (pkg,) = staged["py_modules"]
    assert Path(pkg).name == "spear"
    for part in ("pipeline/cli.py", "cluster/jobs.py", "models/__init__.py", "stages", "schemas"):
        assert (Path(pkg) / part).exists(), part
    everything = [p for p in Path(pkg).rglob("*")]
    assert not [p for p in everything if p.name == "__pycache__" or p.suffix == ".pyc"]
    assert sum(p.stat().st_size for p in everything if p.is_file()) < MAX_UPLOAD_BYTES / 10


def test_credentials_travel_as_job_env_vars_and_are_masked_everywhere(tmp_path):
    sub = build_submission(["spear", "tokenize", "--input", "s3://b/speech", "--domain", "speech", "--output", "s3://b/t",
                            "--set", "storage.secret_access_key=hunter2-from-set", "--set", "decode.max_segment_seconds=9"],
                           env=SECRET_ENV, cli=cli)
    assert sub.env_vars["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE123"
    assert sub.env_vars["AWS_SECRET_ACCESS_KEY"] == "hunter2-from-set"  # --set wins over the shell, off the command line
    assert sub.env_vars["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and sub.env_vars["AWS_REGION"] == "eu-west-1"
    shown = json.dumps(sub.to_dict()) + sub.entrypoint + sub.display_entrypoint
    for secret in ("hunter2-from-set", "AKIDEXAMPLE123", "wJalrXUtnFEMI-example-secret"):
        assert secret not in shown
    assert "decode.max_segment_seconds=9" in sub.entrypoint and "storage.secret_access_key" not in sub.entrypoint
    staged = stage_runtime_env(sub, str(tmp_path / "stage"), ship_package=False)
    assert "py_modules" not in staged
    on_disk = "".join(p.read_text() for p in Path(staged["working_dir"]).rglob("*") if p.is_file())
    assert "hunter2" not in on_disk and "wJalrXU" not in on_disk
    assert mask("key=AKIDEXAMPLE123 secret=hunter2-from-set", sub.secrets) == "key=*** secret=***"

    none = build_submission(["spear", "tokenize"], env=SECRET_ENV, forward_credentials=False,
                            extra_env={"HF_HUB_OFFLINE": "1"}, cli=cli)
    assert none.env_vars == {"HF_HUB_OFFLINE": "1"}
    assert set(none.secrets) == {SECRET_ENV[k] for k in CREDENTIAL_VARS if k in SECRET_ENV}  # still masked


def test_a_config_file_holding_credentials_is_refused(tmp_path):
    bad = tmp_path / "leaky.yaml"
    bad.write_text(yaml.safe_dump({"storage": {"endpoint_url": "http://x", "secret_access_key": "oops-in-file"}}))
    with pytest.raises(JobError, match=r"storage.secret_access_key.*AWS_SECRET_ACCESS_KEY"):
        build_submission(["spear", "decode", str(bad)], env={}, cli=cli)
    r = spear("submit", "--address", "http://127.0.0.1:9", "--", "spear", "decode", str(bad))
    assert r.returncode == 2 and "must not carry credentials" in r.stderr and "oops-in-file" not in r.stderr + r.stdout


@pytest.mark.parametrize("command, message", [
    (["spear", "decodee"], "is not a spear command"),
    (["spear", "decode", "--no-such-option"], "No such option"),
    (["spear", "decode", "--domain", "music"], "'music' is not one of"),
    (["spear", "submit", "--", "spear", "decode"], "cannot be submitted"),
    (["spear"], "no spear command to submit"),
])
def test_command_lines_the_cli_would_reject_are_rejected_before_submission(command, message):
    with pytest.raises(JobError, match=message):
        build_submission(command, env={}, cli=cli)


def test_json_is_added_only_where_the_command_takes_it():
    assert build_submission(["python", "-m", "spear.pipeline.cli", "config", "show"], env={}, cli=cli).args == ["config", "show"]
    assert build_submission(["spear", "decode", "--json"], env={}, cli=cli).args == ["decode", "--json"]
    assert build_submission(["status", "s3://b/t"], env={}, cli=cli).args == ["status", "--json", "s3://b/t"]


def test_summary_is_the_last_json_object_line_and_addresses_resolve():
    log = 'INFO starting\n{"not": "last"}\n[decode] 1 segments\n{"objects": 2, "segments": 1}\nINFO done {x}\n'
    assert last_json_object(log) == {"objects": 2, "segments": 1}
    assert last_json_object("error: invalid config\n[1, 2]\n{broken\n") is None
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://h:8265/", "RAY_ADDRESS": "h:6379"}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265"
    assert resolve_address("http://x:1", {"RAY_ADDRESS": "http://h:8265"}) == "http://x:1"
    with pytest.raises(JobError, match="--address"):
        resolve_address(None, {})


def test_job_commands_fail_with_one_line_without_a_cluster():
    env = {"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""}
    r = spear("status", env=env)
    assert r.returncode == 2 and "missing OUTPUT" in r.stderr
    r = spear("status", "raysubmit_abc", env=env)
    assert r.returncode == 2 and "--address" in r.stderr and "Traceback" not in r.stderr
    r = spear("submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "spear", "decode", "--output", "s3://b/out",
              env=env)
    assert r.returncode == 1 and "cannot reach the Ray Jobs API" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


# --------------------------------------------------------------------------- a real two-node cluster


def _free_port_range(n: int) -> tuple[int, int]:
    for _ in range(500):
        base = random.randint(20000, 50000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base, base + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class LocalRayCluster:
    """A head and worker nodes started with `ray start --block`, each in its own session, temp dir and ports.

    Stopping signals those sessions only (never `ray stop`, which would stop every Ray on the machine).
    """

    def __init__(self, root: str, num_cpus: int = 1, object_store_mb: int = 150):
        self.root = root
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        # No AWS credentials on the cluster: a job gets them from its submission or not at all.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` of the nodes
        return env

    def _start(self, name: str, role_args: list[str]) -> None:
        lo, hi = _free_port_range(40)
        args = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", *role_args, "--block",
                "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
                "--object-store-memory", str(self.object_store_mb * 2**20), "--disable-usage-stats",
                "--temp-dir", os.path.join(self.root, name),
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--min-worker-port", str(lo), "--max-worker-port", str(hi),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
        log = open(os.path.join(self.root, f"{name}.log"), "wb")
        self.procs.append(subprocess.Popen(args, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def start(self, workers: int = 1, timeout_s: float = 300) -> "LocalRayCluster":
        self._start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port())])
        self._wait_nodes(1, timeout_s)
        for i in range(workers):
            self._start(f"worker{i}", ["--address", f"127.0.0.1:{self.gcs_port}"])
        self._wait_nodes(1 + workers, timeout_s)
        return self

    def alive_nodes(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
                nodes = json.load(r)["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for n in nodes if n["raylet"]["state"] == "ALIVE")

    def _logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in Path(self.root).glob("*.log"))

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"`ray start` exited with {dead[0].returncode}:\n{self._logs()}")
            if self.alive_nodes() >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout_s:g} s:\n{self._logs()}")

    def processes(self) -> list[int]:
        """Live processes in the sessions of our `ray start` processes (GCS, raylets, workers, agents...)."""
        sessions = {p.pid for p in self.procs}
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    zombie = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                    if os.getsid(int(entry)) in sessions and not zombie:
                        pids.append(int(entry))
                except (OSError, IndexError):
                    pass  # gone meanwhile
        return pids

    def stop(self, timeout_s: float = 5) -> list[int]:
        """SIGTERM to our sessions (`ray start --block` shuts its node down), SIGKILL what is left; returns survivors."""
        for p in reversed(self.procs):  # workers first, then the head
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.processes()


@pytest.fixture(scope="module")
def two_nodes():
    root = tempfile.mkdtemp(prefix="spear-ray2-")
    cluster = LocalRayCluster(root)
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        survivors = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes of the test cluster still alive: {survivors}"


@pytest.fixture
def s3_env(s3_server):
    """The object store's endpoint and credentials, as a user's shell would hold them."""
    return s3_server.env()


def _no_secret(s3_server, *texts: str) -> None:
    for t in texts:
        assert s3_server.secret_key not in t and s3_server.access_key not in t


SMALL_TOKENIZE = {"mvq": {"speech_codebooks": 4, "audio_codebooks": 2, "codebook_size": 16, "sample_frames": 1000,
                          "heldout_fraction": 0.1},
                  "teachers": {"audio": None},  # speech-only corpora here: the speech teacher alone
                  "decode": {"max_segment_seconds": 2, "objects_per_task": 1},
                  "tokenize": {"shard_target_mb": 0.1, "commit_interval_s": 0.5}}


def _write_config(tmp_path, data: dict, name: str = "job.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.slow
@pytest.mark.s3
def test_invalid_config_job_fails_and_status_shows_the_validation_message(two_nodes, s3_env, s3_server, tmp_path):
    """`spear submit` checks the config before submitting; a job submitted another way (here the JobClient
    directly, as `ray job submit` would) fails at once in its driver, and `spear status` shows why."""
    bad = _write_config(tmp_path, {"decode": {"max_segment_seconds": "lots"}}, "bad.yaml")
    command = ["spear", "tokenize", bad, "--input", "s3://spear/none", "--domain", "speech", "--output", "s3://spear/x"]
    client = JobClient(two_nodes.address)
    before = {j.job_id for j in client.list().jobs}
    r = spear("submit", "--address", two_nodes.address, "--wait", "--json", "--", *command, env=s3_env)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    assert "decode.max_segment_seconds: must be a valid number" in r.stderr
    assert {j.job_id for j in client.list().jobs} == before  # nothing was submitted

    job_id = client.submit(build_submission(command, cli=cli, env=s3_env)).job_id
    result = client.wait(job_id)
    assert result.status == "FAILED" and result.summary is None and result.address == two_nodes.address
    st = spear("status", "--address", two_nodes.address, job_id)
    assert st.returncode == 0, st.stderr
    assert f"{job_id}: FAILED" in st.stdout
    assert "invalid config files/bad.yaml" in st.stdout
    assert "decode.max_segment_seconds: must be a valid number" in st.stdout
    _no_secret(s3_server, r.stdout, r.stderr, st.stdout, st.stderr)


@pytest.mark.slow
def test_a_job_with_a_relative_output_is_refused_before_it_writes_anything(two_nodes, tmp_path):
    """A submitted job's driver runs in a temporary working directory on the cluster: a relative output (given, or
    the config's default) would be written there and lost when the job ends, the job saying it succeeded.
    `spear submit` refuses it before submitting; a job submitted another way (`ray job submit`, here the
    JobClient directly) refuses it in its driver."""
    client = JobClient(two_nodes.address)
    before = {j.job_id for j in client.list().jobs}
    command = ["spear", "train", "--shards", str(tmp_path), "--output", "student"]
    line = "error: output 'student' is a relative path: a submitted job runs in a temporary working directory"
    r = spear("submit", "--address", two_nodes.address, "--wait", "--", *command)
    assert r.returncode == 2 and line in r.stderr, r.stderr[-3000:]
    assert {j.job_id for j in client.list().jobs} == before  # nothing was submitted
    state = client.wait(client.submit(build_submission(command, cli=cli, env={})).job_id)
    assert state.status == "FAILED" and state.error is not None and state.error.startswith(line), state


@pytest.mark.slow
def test_the_job_runs_the_package_that_submitted_it(two_nodes, tmp_path, monkeypatch):
    """The runtime_env's py_modules copy of spear is what the driver imports (not an installed one)."""
    from ray.job_submission import JobSubmissionClient

    # Ray's own client prefers these to its address argument: set by an earlier test's Ray in this process,
    # they would send the job elsewhere (spear's JobClient clears them itself)
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    sub = build_submission(["spear", "config", "show"], env={}, cli=cli)
    runtime_env = stage_runtime_env(sub, str(tmp_path))
    client = JobSubmissionClient(two_nodes.address)
    probe = "import spear.pipeline.cli as c, spear.cluster.jobs as j; print(c.__file__); print(j.__file__)"
    job = client.submit_job(entrypoint=f"python -c '{probe}'", runtime_env=runtime_env)
    deadline = time.monotonic() + 300
    while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert str(client.get_job_status(job)) == "SUCCEEDED", logs
    paths = [ln for ln in logs.splitlines() if ln.endswith(".py")]
    assert len(paths) == 2 and all("runtime_resources/py_modules_files" in p for p in paths), logs
    assert all(two_nodes.root in p for p in paths)


def test_address_wins_over_the_ray_address_in_the_environment(two_nodes):
    """Ray's JobSubmissionClient takes RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address it is given:
    on a cluster node (where RAY_ADDRESS is set) `--address` of another cluster sent the job to this one
    while spear named the other. --address is the cluster a job goes to, or the command fails."""
    from spear.cluster.jobs import JobClient

    client = JobClient(two_nodes.address)  # (this process may have RAY_ADDRESS set too: another test's Ray)

    def job_ids() -> set[str]:
        return {j.job_id for j in client.list().jobs}

    before = job_ids()
    env = {"RAY_API_SERVER_ADDRESS": two_nodes.address, "RAY_ADDRESS": two_nodes.address}
    elsewhere = f"http://127.0.0.1:{free_port()}"
    r = spear("submit", "--address", elsewhere, "--", "spear", "config", "show", env=env)
    assert r.returncode == 1 and f"cannot reach the Ray Jobs API at {elsewhere}" in r.stderr, r.stderr
    assert job_ids() == before  # nothing went to the environment's cluster
    # without --address the environment's cluster is the one
    r = spear("submit", "--", "spear", "config", "show", env=env)
    assert r.returncode == 0, r.stderr
    assert len(job_ids() - before) == 1


@pytest.fixture(scope="module")
def tokenized(two_nodes, s3_server, s3_storage, tmp_path_factory):
    """One `spear submit --wait --json -- spear tokenize ...` over a speech corpus on SeaweedFS.

    Returns the CLI result and the output's status right after the job (later tests grow the corpus).
    """
    from spear.pipeline.status import output_status
    from support.corpus import write_mixed_corpus

    root = f"s3://{s3_server.bucket}/jobs-{uuid.uuid4().hex[:8]}"
    corpus = join_uri(root, "corpus", "speech")
    write_mixed_corpus(s3_storage, join_uri(root, "corpus"), n_speech=3, n_audio=0, seed=3, seconds=(1.5, 2.5))
    cfg = _write_config(tmp_path_factory.mktemp("tokenize"), SMALL_TOKENIZE)
    out = join_uri(root, "tokens")
    r = spear("submit", "--address", two_nodes.address, "--wait", "--json", "--env", "HF_HUB_OFFLINE=1", "--",
              "spear", "tokenize", cfg, "--input", corpus, "--domain", "speech", "--output", out,
              env=s3_server.env())
    return {"cfg": cfg, "corpus": corpus, "out": out, "run": r, "status": output_status(out, s3_storage)}


@pytest.mark.slow
@pytest.mark.s3
def test_tokenize_job_on_two_nodes_with_seaweedfs(tokenized, two_nodes, s3_server, s3_storage):
    from spear.pipeline.ledger import TokenStore

    r, out = tokenized["run"], tokenized["out"]
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert result["status"] == "SUCCEEDED" and result["job_id"].startswith("raysubmit_")
    assert result["address"] == two_nodes.address
    summary = result["summary"]
    assert summary["output"] == out and summary["new_objects"] == 3 and summary["committed_objects"] == 3
    assert "files/job.yaml" in result["entrypoint"]
    assert "[tokenize] pass 2" in r.stderr  # the job's log, streamed
    # the codebook fit (minutes on CPU at the demo's size) shows each codebook it initialised, the last included
    assert re.search(r"\[tokenize\] speech codebooks: k-means init codebook (\d+)/\1: ", r.stderr), r.stderr[-4000:]

    (v,) = tokenized["status"].versions  # on SeaweedFS, committed, nothing left over
    assert v.token_version == summary["token_version"]
    assert v.segments == summary["committed_segments"] > 0 and not v.uncommitted
    assert v.sources["speech"]["objects"] == 3
    table = TokenStore(out, v.token_version, s3_storage).read_table(["segment_id", "speech_tokens"])
    assert table.num_rows == v.segments

    logs = spear("logs", "--address", two_nodes.address, result["job_id"])
    assert logs.returncode == 0 and "[tokenize] pass 1" in logs.stdout
    assert last_json_object(logs.stdout) == summary
    st = spear("status", "--address", two_nodes.address, "--json", result["job_id"])
    assert json.loads(st.stdout)["status"] == "SUCCEEDED" and json.loads(st.stdout)["summary"] == summary
    listing = spear("status", "--address", two_nodes.address)
    assert result["job_id"] in listing.stdout and "SUCCEEDED" in listing.stdout
    _no_secret(s3_server, r.stdout, r.stderr, logs.stdout, st.stdout, listing.stdout)


TINY_TRAIN = ["train.student.size=tiny", "train.batch_seconds=8", "train.warmup_steps=2", "train.checkpoint_every=2"]


@pytest.mark.slow
@pytest.mark.s3
def test_train_job_on_two_nodes_trains_on_the_tokens_and_checkpoints_to_seaweedfs(tokenized, two_nodes, s3_env,
                                                                                 s3_server, s3_storage):
    """`spear train` as a job on the 1-CPU nodes: checkpoints, metrics and summary all come back through S3 / the API."""
    from spear.pipeline.train_job import checkpoints
    from spear.schemas.train_metrics import METRICS_FILE

    assert tokenized["run"].returncode == 0, "the tokenize job failed (see the tokenize test)"
    (version,) = tokenized["status"].versions
    out = join_uri(tokenized["out"].rsplit("/", 1)[0], "student")
    steps = 4
    r = spear("submit", "--address", two_nodes.address, "--wait", "--json", "--",
              "spear", "train", "--shards", tokenized["out"], "--output", out, "--max-steps", str(steps),
              *[a for s in TINY_TRAIN for a in ("--set", s)], env=s3_env)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)
    assert result["status"] == "SUCCEEDED" and result["address"] == two_nodes.address
    summary = result["summary"]
    assert summary["step"] == steps and summary["resumed_from_step"] is None and summary["world_sizes"] == [1]
    assert summary["token_version"] == version.token_version and summary["output"] == out
    assert summary["checkpoint"].startswith(join_uri(out, "train") + "/")
    assert summary["first_loss"] > 0 and summary["last_loss"] > 0
    assert f"[train] token version {version.token_version}" in r.stderr  # the job's log, streamed

    # On SeaweedFS: checkpoints every 2 steps (the last one is the summary's), one metrics row per step
    found = checkpoints(out, s3_storage)
    assert [s for s, _ in found] == [2, 4] and found[-1][1] == summary["checkpoint"]
    for uri in (join_uri(summary["checkpoint"], METRICS_FILE), summary["metrics"]["csv"]):
        rows = list(csv.DictReader(io.StringIO(s3_storage.read_text(uri))))
        assert [int(row["step"]) for row in rows] == list(range(1, steps + 1)), uri
    assert s3_storage.exists(summary["metrics"]["plot"]) and summary["metrics"]["plot"].startswith("s3://")

    # The training worker was an actor of this job on the cluster, sized to fit a 1-CPU node
    from ray.util.state import get_placement_group

    (worker,) = _job_actors(two_nodes, result["job_id"], "TrainWorker")
    group = get_placement_group(worker.placement_group_id, address=two_nodes.address)
    assert [b["unit_resources"] for b in group.bundles] == [{"CPU": 0.5}], group

    logs = spear("logs", "--address", two_nodes.address, result["job_id"])
    assert logs.returncode == 0 and f"[train] token version {version.token_version}" in logs.stdout
    assert last_json_object(logs.stdout) == summary
    _no_secret(s3_server, r.stdout, r.stderr, logs.stdout)


def _job_actors(cluster: LocalRayCluster, submission_id: str, class_part: str) -> list:
    """The actors (alive or dead) that the submitted job created on the cluster, by class name."""
    from ray.util.state import list_actors

    from spear.cluster.jobs import JobClient

    ray_job = JobClient(cluster.address)._client.get_job_info(submission_id).job_id  # the SDK client, env-proof
    actors = list_actors(address=cluster.address, filters=[("job_id", "=", ray_job)], detail=True, limit=1000)
    return [a for a in actors if class_part in a.class_name]


@pytest.mark.slow
@pytest.mark.s3
def test_stopping_a_running_tokenize_job_leaves_only_consistent_commits(tokenized, two_nodes, s3_env, s3_server,
                                                                       s3_storage):
    """The corpus grows; the incremental re-run is stopped mid-pass-2: earlier commits stay whole, nothing half-done shows."""
    from spear.pipeline.ledger import TokenStore, list_token_versions
    from spear.schemas.ledger import Manifest
    from spear.pipeline.status import output_status
    from support.corpus import write_mixed_corpus

    assert tokenized["run"].returncode == 0, "the first run failed (see the test above)"
    out = tokenized["out"]
    before = {u for v in tokenized["status"].versions for u in _tokenized_uris(out, v.token_version, s3_storage)}
    corpus_root = tokenized["corpus"].rsplit("/", 1)[0]
    added = write_mixed_corpus(s3_storage, corpus_root, n_speech=40, n_audio=0, seed=7, seconds=(1.5, 2.0))["speech"]
    r = spear("submit", "--address", two_nodes.address, "--json", "--",
              "spear", "tokenize", tokenized["cfg"], "--input", tokenized["corpus"], "--domain", "speech",
              "--output", out, env=s3_env)
    assert r.returncode == 0, r.stderr[-3000:]
    job = json.loads(r.stdout)["job_id"]
    client = JobClient(two_nodes.address)
    try:
        while "[tokenize] pass 2" not in client.logs(job):
            assert not client.status(job, with_summary=False).terminal, client.logs(job)[-3000:]
            time.sleep(0.2)
    except BaseException:
        client.stop(job, wait=False)
        raise
    stop = spear("stop", "--address", two_nodes.address, "--json", job)
    assert stop.returncode == 0, stop.stderr
    final = json.loads(stop.stdout)
    assert final["status"] == "STOPPED", f"the job ended {final['status']} before the stop landed"

    # Every manifest ever committed names only files that exist; the committed state reads back whole.
    (version,) = list_token_versions(out, s3_storage)
    store = TokenStore(out, version, s3_storage)
    for seq in range(1, store.latest_manifest().seq + 1):
        m = Manifest.from_json(s3_storage.read_text(join_uri(store.root, "manifests", f"{seq:08d}.json")))
        for f in [s["file"] for s in m.shards] + m.ledger_files:
            assert s3_storage.exists(resolve_uri(store.root, f)), f"manifest {seq} names a missing file {f}"
    done = _tokenized_uris(out, version, s3_storage)
    rows = store.read_table(["segment_id", "source_uri"])
    assert set(rows["source_uri"].to_pylist()) == done  # live rows are exactly the committed objects'
    assert before <= done and len(done) < len(before) + len(added)  # nothing lost, the stopped run unfinished
    (v,) = output_status(out, s3_storage).versions
    assert v.segments == rows.num_rows
    logs = spear("logs", "--address", two_nodes.address, "--follow", job)  # a stopped job's log, to its end
    assert logs.returncode == 0 and "[tokenize] pass 2" in logs.stdout
    _no_secret(s3_server, r.stdout, r.stderr, stop.stdout, stop.stderr, logs.stdout)


def _tokenized_uris(out: str, version: str, storage: Storage) -> set[str]:
    from spear.pipeline.ledger import TokenStore

    ledger = TokenStore(out, version, storage).ledger()
    return set(ledger.filter(pc.equal(ledger["status"], "tokenized"))["source_uri"].to_pylist())


@pytest.mark.slow
@pytest.mark.s3
def test_spear_run_config_runs_unchanged_on_the_cluster(two_nodes, s3_env, s3_server, s3_storage, tmp_path):
    """`spear run CONFIG` (tokenize -> train -> export -> evaluate) as one job: the config an embedded run takes,
    with every input and output on SeaweedFS; only `spear submit --address` says where it runs."""
    from spear.stages.artefacts import load_student
    from support.corpus import write_mixed_corpus

    root = f"s3://{s3_server.bucket}/run-{uuid.uuid4().hex[:8]}"
    corpus = write_mixed_corpus(s3_storage, join_uri(root, "corpus"), n_speech=4, n_audio=4, seed=11,
                                seconds=(1.5, 2.5))
    # labelled data for the evaluation: a manifest on the object store (speech vs audio, 3 + 3 train, 1 + 1 test)
    manifest = join_uri(root, "labels", "domain.csv")
    s3_storage.write_text(manifest, "uri,label,split\n" + "".join(
        f"{uri},{domain},{'test' if i == 3 else 'train'}\n" for domain, uris in corpus.items()
        for i, uri in enumerate(uris)))
    out = join_uri(root, "out")
    config = {"output": out,
              "corpus": {"sources": [{"uri": join_uri(root, "corpus", d), "domain": d} for d in ("speech", "audio")]},
              "mvq": SMALL_TOKENIZE["mvq"], "decode": SMALL_TOKENIZE["decode"], "tokenize": SMALL_TOKENIZE["tokenize"],
              "train": {"max_steps": 4, "batch_seconds": 8, "warmup_steps": 2, "checkpoint_every": 2,
                        "student": {"size": "tiny"}},
              "evaluate": {"seeds": [0], "manifests": [manifest]}}
    cfg = _write_config(tmp_path, config, "run.yaml")
    r = spear("submit", "--address", two_nodes.address, "--wait", "--json", "--", "spear", "run", cfg, env=s3_env)
    assert r.returncode == 0, r.stderr[-6000:]
    result = json.loads(r.stdout)
    assert result["status"] == "SUCCEEDED" and result["address"] == two_nodes.address
    assert result["entrypoint"] == "python -m spear.pipeline.cli run --json files/run.yaml"
    s = result["summary"]
    assert s["output"] == out and s["evaluate_skipped"] is None
    for step in ("1/4 tokenize", "2/4 train", "3/4 export", "4/4 evaluate"):
        assert f"[spear run] {step}" in r.stderr
    # two teacher pools on two 1-CPU nodes: decode tasks ask for what one node keeps free (a whole CPU never is)
    assert "the teacher actors hold the rest of 2 on 2 node(s)" in r.stderr

    tok, tr, ex, ev = s["tokenize"], s["train"], s["export"], s["evaluate"]
    assert tok["output"] == join_uri(out, "tokens") and tok["new_objects"] == 8 and tok["committed_objects"] == 8
    assert tr["step"] == 4 and tr["token_version"] == tok["token_version"] and tr["output"] == join_uri(out, "student")
    assert ex["output"] == join_uri(out, "student", "export") and ex["step"] == 4
    assert ev["output"] == join_uri(out, "evaluation") and ev["seeds"] == [0] and not ev["skipped_files"]

    # Everything is on SeaweedFS: the tokens, the checkpoints, a loadable export, the report
    from spear.pipeline.train_job import checkpoints

    assert checkpoints(tr["output"], s3_storage)[-1] == (4, tr["checkpoint"])
    rows = list(csv.DictReader(io.StringIO(s3_storage.read_text(tr["metrics"]["csv"]))))
    assert len(rows) == 4
    student = load_student(ex["output"], storage=s3_storage)
    assert list(student.layer_dims) == ex["layer_dims"]
    results = json.loads(s3_storage.read_text(ev["results_json"]))
    assert ev["report"] == join_uri(out, "evaluation", "index.html") and s3_storage.exists(ev["report"])
    probed = {(p["task"], p["model"]) for p in results["probes"]}
    assert {m["name"] for m in results["models"]} == {"student", "random_student", "teacher:mfcc", "teacher:fbank",
                                                      "fbank"}
    assert {("domain", m["name"]) for m in results["models"]} <= probed
    assert all(p["num_train"] == 6 and p["num_test"] == 2 for p in results["probes"])
    assert results["probes"] == ev["probes"]  # the job's --json summary is the report's results.json

    logs = spear("logs", "--address", two_nodes.address, result["job_id"])
    assert logs.returncode == 0 and "[spear run] 4/4 evaluate" in logs.stdout
    assert last_json_object(logs.stdout) == s
    _no_secret(s3_server, r.stdout, r.stderr, logs.stdout)
