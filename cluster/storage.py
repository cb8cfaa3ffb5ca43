"""Object storage: one API over local paths, ``file://`` and ``s3://`` URIs.

Everything in SPEAR that reads or writes data goes through :class:`Storage`, so the
same job runs against local disk, AWS S3 or any S3-compatible server (SeaweedFS,
MinIO). Credentials come from the config's ``storage`` section or, when unset, from the
standard AWS variables / profile; they are never printed or logged.

Example::

    >>> from spear.cluster.storage import Storage
    >>> st = Storage()                       # local disk
    >>> st.write_bytes("/tmp/spear-doc/x.bin", b"abc")
    >>> st.read_bytes("file:///tmp/spear-doc/x.bin")
    b'abc'

This module never imports Ray: models (e.g. the MVQ artefact) use it too.
"""

from __future__ import annotations

import errno
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, TypeVar

import fsspec

T = TypeVar("T")


class StorageError(RuntimeError):
    """Storage is unreachable, denies access, or a path is wrong; the message says which and where."""


@dataclass(frozen=True)
class StorageOptions:
    """Resolved, picklable storage settings (secrets included: hand to workers, never log)."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    profile: Optional[str] = None
    key: Optional[str] = field(default=None, repr=False)
    secret: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)
    anonymous: bool = False
    retries: int = 5
    connect_timeout_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: Any = None) -> "StorageOptions":
        """From a :class:`~spear.pipeline.config.StorageConfig` (or None), filled from the AWS environment."""
        env = os.environ

        def secret(v: Any) -> Optional[str]:
            return v.get_secret_value() if v is not None and hasattr(v, "get_secret_value") else v

        get = (lambda name: getattr(cfg, name, None)) if cfg is not None else (lambda name: None)
        return cls(
            endpoint_url=get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            profile=get("profile") or env.get("AWS_PROFILE"),
            key=secret(get("access_key_id")) or env.get("AWS_ACCESS_KEY_ID"),
            secret=secret(get("secret_access_key")) or env.get("AWS_SECRET_ACCESS_KEY"),
            token=env.get("AWS_SESSION_TOKEN"),
            anonymous=bool(get("anonymous") or False),
            retries=int(get("retries") if get("retries") is not None else 5),
            connect_timeout_s=float(get("connect_timeout_s") or 5.0),
        )


@dataclass(frozen=True)
class FileEntry:
    """One listed object."""

    uri: str
    size: int
    etag: str  # S3 ETag, or "<size>-<mtime_ns>" on local disk
    mtime: float


def split_uri(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/key') or ('file', '/abs/path') for any accepted URI or path."""
    uri = str(uri)
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        return "s3", uri.split("://", 1)[1]
    if uri.startswith("file://"):
        return "file", os.path.abspath(uri[len("file://"):])
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return "file", os.path.abspath(uri)


def join_uri(base: str, *parts: str) -> str:
    """Join path components onto a URI or path, keeping its scheme."""
    base = str(base)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] != "file"


_RETRYABLE_MARKERS = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500",
                      "Connection reset", "Connection was closed", "ServerDisconnected", "EndpointConnectionError")


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(m in text for m in _RETRYABLE_MARKERS)


def _is_auth_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, PermissionError) or any(
        m in text for m in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403", "NoCredentials"))


def _is_unreachable(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(m in text for m in ("Could not connect", "EndpointConnectionError", "Connection refused",
                                   "Cannot connect", "ConnectTimeout", "Name or service not known",
                                   "ClientConnectorError"))


class Storage:
    """Read, write and list objects by URI. Picklable: it carries only :class:`StorageOptions`."""

    def __init__(self, options: StorageOptions | None = None):
        self.options = options or StorageOptions.from_config(None)
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def __getstate__(self) -> dict:
        return {"options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.options = state["options"]
        self._fs = {}

    # ----------------------------------------------------------------- filesystems

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path inside it."""
        scheme, path = split_uri(uri)
        fs = self._fs.get(scheme)
        if fs is None:
            fs = self._fs[scheme] = self._make_fs(scheme)
        return fs, path

    def _make_fs(self, scheme: str) -> fsspec.AbstractFileSystem:
        if scheme == "file":
            return fsspec.filesystem("file", auto_mkdir=True)
        import s3fs  # imported lazily: local-only runs never need it

        o = self.options
        client_kwargs: dict[str, Any] = {}
        if o.endpoint_url:
            client_kwargs["endpoint_url"] = o.endpoint_url
        if o.region:
            client_kwargs["region_name"] = o.region
        config_kwargs = {
            "connect_timeout": o.connect_timeout_s,
            "read_timeout": max(30.0, o.connect_timeout_s),
            # botocore's own retries cover throttling (SlowDown) with backoff.
            "retries": {"max_attempts": max(1, o.retries), "mode": "adaptive"},
        }
        return s3fs.S3FileSystem(
            anon=o.anonymous,
            key=o.key,
            secret=o.secret,
            token=o.token,
            profile=o.profile if not o.key else None,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def pyarrow_filesystem(self, uri: str):
        """(pyarrow.fs.FileSystem, path) for pyarrow / Ray Data readers and writers."""
        import pyarrow.fs as pafs

        scheme, path = split_uri(uri)
        if scheme == "file":
            return pafs.LocalFileSystem(), path
        fs, path = self.filesystem(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    # ----------------------------------------------------------------- error handling

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """Run a storage call with retry + backoff on transient errors; map the rest to StorageError."""
        attempts = max(1, self.options.retries)
        delay = 0.2
        for attempt in range(attempts):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_auth_error(exc):
                    raise StorageError(
                        f"access denied while trying to {what} {uri}: check the credentials "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage.* in the config)"
                    ) from None
                if _is_unreachable(exc) and attempt == attempts - 1:
                    raise StorageError(
                        f"cannot reach storage to {what} {uri} (endpoint {self.options.endpoint_url or 'default AWS'}): "
                        f"{type(exc).__name__}: {exc}") from None
                if not (_is_retryable(exc) or _is_unreachable(exc)) or attempt == attempts - 1:
                    raise StorageError(f"failed to {what} {uri}: {type(exc).__name__}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def check_access(self, uri: str, *, must_exist: bool = False) -> None:
        """Fail fast with a clear StorageError when ``uri``'s storage is unreachable or denies access."""
        fs, path = self.filesystem(uri)
        scheme, _ = split_uri(uri)
        if scheme == "s3":
            bucket = path.split("/", 1)[0]
            try:
                # head_bucket raises on every failure, where fs.exists() would swallow them.
                self._call("reach bucket", f"s3://{bucket}", lambda: fs.call_s3("head_bucket", Bucket=bucket))
            except FileNotFoundError:
                raise StorageError(f"bucket s3://{bucket} does not exist") from None
        if must_exist and not self.exists(uri):
            raise StorageError(f"{uri} does not exist")

    # ----------------------------------------------------------------- operations

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return self._call("check", uri, lambda: fs.exists(path))

    def isdir(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return self._call("check", uri, lambda: fs.isdir(path))

    def read_bytes(self, uri: str) -> bytes:
        """Whole object. Raises FileNotFoundError for a missing object, StorageError for the rest."""
        fs, path = self.filesystem(uri)
        return self._call("read", uri, lambda: fs.cat_file(path))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write an object atomically: readers see the old object or the whole new one, never a part.

        S3 PUTs are atomic already; on local disk the bytes go to a temporary file that is renamed.
        """
        scheme, path = split_uri(uri)
        if scheme == "file":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        fs, path = self.filesystem(uri)
        self._call("write", uri, lambda: fs.pipe_file(path, data))

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def delete(self, uri: str, *, recursive: bool = False) -> None:
        fs, path = self.filesystem(uri)
        try:
            self._call("delete", uri, lambda: fs.rm(path, recursive=recursive))
        except FileNotFoundError:
            pass

    def makedirs(self, uri: str) -> None:
        scheme, path = split_uri(uri)
        if scheme == "file":
            os.makedirs(path, exist_ok=True)
        # object stores have no directories

    def list_files(self, uri: str, extensions: Iterable[str] | None = None) -> list[FileEntry]:
        """Every object under ``uri`` (recursively), optionally filtered by extension, sorted by URI.

        A single object URI lists itself. Raises StorageError if the prefix cannot be read.
        """
        fs, path = self.filesystem(uri)
        scheme, _ = split_uri(uri)
        exts = {e.lower().lstrip(".") for e in extensions} if extensions else None
        if scheme == "s3":
            fs.invalidate_cache()

        def listing() -> dict[str, dict]:
            if fs.isfile(path):
                return {path: fs.info(path)}
            if not fs.exists(path):
                raise FileNotFoundError(errno.ENOENT, "no such prefix", uri)
            return fs.find(path, detail=True)

        try:
            found = self._call("list", uri, listing)
        except FileNotFoundError:
            raise StorageError(f"{uri} does not exist (nothing to list)") from None
        except PermissionError as exc:
            raise StorageError(f"cannot list {uri}: {exc}") from None
        out = []
        for p, info in found.items():
            if info.get("type") == "directory":
                continue
            if exts is not None and p.rsplit(".", 1)[-1].lower() not in exts:
                continue
            size = int(info.get("size") or 0)
            if scheme == "s3":
                etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
                mtime = info.get("LastModified") or info.get("last_modified")
                mtime_f = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0.0)
                out.append(FileEntry(f"s3://{p}", size, etag, mtime_f))
            else:
                mtime_f = float(info.get("mtime") or os.stat(p).st_mtime)
                out.append(FileEntry(p, size, f"{size}-{int(mtime_f * 1e9)}", mtime_f))
        out.sort(key=lambda e: e.uri)
        return out
