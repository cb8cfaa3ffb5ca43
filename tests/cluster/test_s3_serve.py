"""`spear s3 serve`: one command starts SeaweedFS, prints the AWS_* lines a user pastes, serves until
Ctrl-C (exit 0, port closed), and a restart on the same --dir serves the same objects."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from spear.cluster.storage import Storage, StorageOptions

pytestmark = pytest.mark.s3

CMD = [sys.executable, "-m", "spear.pipeline.cli", "s3", "serve"]


def _start(args):
    return subprocess.Popen(CMD + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _exports(proc, timeout=120.0) -> dict[str, str]:
    """The `export KEY=VALUE` lines the server prints on stdout once it answers."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")], daemon=True).start()
    env: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while "AWS_REGION" not in env:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()       # its server dies with it (PR_SET_PDEATHSIG)
                pytest.fail(f"no export lines (exit {proc.poll()}): {proc.stderr.read()}")
            continue
        assert line.startswith("export "), line
        key, _, value = line[len("export "):].strip().partition("=")
        env[key] = value
    return env


def _stop(proc, sig=signal.SIGINT) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, proc.stderr.read()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _storage(env) -> Storage:
    return Storage(StorageOptions(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                                  secret=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"]))


def test_serve_prints_credentials_stops_on_sigint_and_keeps_the_objects(tmp_path):
    data = tmp_path / "s3-data"
    proc = _start(["--dir", str(data), "--bucket", "corpus"])
    try:
        env = _exports(proc)
        st = _storage(env)
        st.write_bytes("s3://corpus/speech/a.txt", b"hello")
        assert [os.path.basename(e.uri) for e in st.list_files("s3://corpus/speech")] == ["a.txt"]
    finally:
        code, err = _stop(proc)
    port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    assert code == 0, err
    assert not _port_open(port)
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 30 and secret not in err and secret not in (data / "weed.log").read_text(errors="replace")

    # Same --dir, the same port asked for: the same credentials and objects come back; SIGTERM stops it too.
    again = _start(["--dir", str(data), "--bucket", "corpus", "--port", str(port)])
    try:
        env2 = _exports(again)
        assert env2 == env
        assert _storage(env2).read_bytes("s3://corpus/speech/a.txt") == b"hello"
    finally:
        code, err = _stop(again, signal.SIGTERM)
    assert code == 0, err
    assert not _port_open(port)


def test_the_server_does_not_outlive_a_killed_spear(tmp_path):
    proc = _start(["--dir", str(tmp_path / "d")])
    port = int(_exports(proc)["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _port_open(port)


def test_a_taken_port_or_a_bad_bucket_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(CMD + ["--dir", str(tmp_path / "d"), "--port", str(port)], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"port {port} is in use" in r.stderr, r.stderr
    assert r.stdout == ""
    r = subprocess.run(CMD + ["--dir", str(tmp_path / "d"), "--bucket", "No_Such"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bucket name" in r.stderr, r.stderr


def test_a_port_taken_between_choosing_and_binding_is_chosen_again(tmp_path, monkeypatch):
    """Ports are chosen free and handed to weed, which binds them a moment later: another process may take one
    in between (seen in CI: "Port allocation failed: port N for Admin ... is not available"). The server then
    starts again on freshly chosen ports instead of failing."""
    import spear.cluster.local_s3 as local_s3

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        real, calls = local_s3._free_ports, []

        def first_choice_has_a_taken_port(n):
            calls.append(n)
            ports = real(n)
            admin = local_s3._PORT_FLAGS.index("admin.port")  # the one taken in CI
            return ports if len(calls) > 1 else ports[:admin] + [taken] + ports[admin + 1:]

        monkeypatch.setattr(local_s3, "_free_ports", first_choice_has_a_taken_port)
        (tmp_path / "d").mkdir()
        with local_s3.LocalS3Server(data_dir=str(tmp_path / "d")) as server:
            assert len(calls) == 2 and taken not in server.ports.values()
            st = Storage(server.storage_options())
            st.write_bytes("s3://spear/x.txt", b"ok")
            assert st.read_bytes("s3://spear/x.txt") == b"ok"
