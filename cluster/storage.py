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
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

import fsspec

T = TypeVar("T")


class StorageError(RuntimeError):
    """Storage is unreachable, denies access, or a path is wrong; the message says which and where."""


#: The AWS credential variables: their values are never printed, logged or echoed in an error.
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MASK = "***"


def secrets_in(env: Mapping[str, str] = os.environ) -> list[str]:
    """The credential values set in ``env`` (what :func:`mask` hides)."""
    return [env[k] for k in CREDENTIAL_VARS if env.get(k)]


def mask(text: str, secrets: Iterable[Optional[str]]) -> str:
    """``text`` with every secret value replaced by ``***`` (longest first, so no fragment survives).

    The one masking helper of the project: config errors, run logs, ``config show`` and job output use it.
    Values under 4 characters are left alone: hiding every "s" would garble the text and protect nothing.
    """
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


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
        """From a :class:`~spear.config.StorageConfig` (or None), filled from the AWS environment."""
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
            token=secret(get("session_token")) or env.get("AWS_SESSION_TOKEN"),
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
    """('s3', 'bucket/key') or ('file', '/abs/path') for any accepted URI or path.

    Local forms (relative, absolute, ``~``, ``file://``) all become one absolute path here, the
    entry point every storage call goes through.
    """
    uri = str(uri)
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        return "s3", uri.split("://", 1)[1]
    if uri.startswith("file://"):
        return "file", os.path.abspath(os.path.expanduser(uri[len("file://"):]))
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return "file", os.path.abspath(os.path.expanduser(uri))


def normalize_uri(uri: str) -> str:
    """One spelling per location, independent of the working directory: an absolute local path
    (``~``, relative and ``file://`` forms resolved; symlinks kept as given) or ``s3://bucket/key``
    without a trailing slash. Jobs normalise their roots once, so that Ray workers (another
    working directory) and the records they write name the same place."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return path
    return "s3://" + posixpath.normpath(path).strip("/")


def location_key(uri: str) -> str:
    """What a URI points at, for comparing two spellings: the real path (symlinks resolved) of a
    local file, the bucket/key of an S3 object."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return "file:" + os.path.realpath(path)
    return "s3:" + posixpath.normpath(path).strip("/")


def relative_uri(root: str, uri: str) -> str | None:
    """``uri`` as a '/'-separated name relative to ``root`` (both any spelling), or None when it is not under it."""
    r_scheme, r_path = split_uri(root)
    scheme, path = split_uri(uri)
    if scheme != r_scheme:
        return None
    if scheme == "s3":
        r_path, path = posixpath.normpath(r_path).strip("/"), posixpath.normpath(path).strip("/")
        return path[len(r_path) + 1:] if path.startswith(r_path + "/") else None
    for a, b in ((r_path, path), (os.path.realpath(r_path), os.path.realpath(path))):
        rel = os.path.relpath(b, a)
        if rel != os.curdir and not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            return rel.replace(os.sep, "/")
    return None


def is_absolute_uri(name: str) -> bool:
    """True for a URI with a scheme or an absolute (or ``~``) local path; False for a relative name."""
    name = str(name)
    return "://" in name or os.path.isabs(name) or name.startswith("~")


def resolve_uri(root: str, name: str) -> str:
    """A name recorded in an output (relative to ``root``; absolute ones are kept) as a URI to read."""
    if is_absolute_uri(name):
        return name
    return join_uri(root, *name.split("/"))


def find_recorded(storage: "Storage", root: str, name: str, marker: str) -> Optional[str]:
    """Where a file named by an older record (absolute, or relative to the writer's working directory) is now.

    The part of ``name`` after ``marker`` found under ``root`` wins (the folder was moved, copied or
    uploaded, or is read from another directory); else the recorded path if it still exists; else None.
    """
    tail = name.replace("\\", "/").rsplit(marker, 1)[1] if marker in name else None
    if tail and storage.exists(resolve_uri(root, tail)):
        return resolve_uri(root, tail)
    if storage.exists(name):
        return name if is_absolute_uri(name) else normalize_uri(name)
    return None


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


#: S3 endpoints that accepted a connection in this process (Storage objects are made per task).
_ANSWERED: set[str] = set()


def _tcp_probe(host: str, port: int, timeout: float) -> Optional[str]:
    """None when ``host:port`` accepts a TCP connection, else why not in words; the name lookup and
    the connection together take at most about ``timeout`` seconds."""
    import socket
    import threading

    found: dict[str, Any] = {}
    deadline = time.monotonic() + timeout

    def resolve() -> None:
        try:
            found["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            found["error"] = exc

    lookup = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout of its own
    lookup.start()
    lookup.join(timeout)
    if lookup.is_alive():
        return f"the name {host} did not resolve within {timeout:g} s"
    if "error" in found:
        exc = found["error"]
        return f"the name {host} does not resolve ({getattr(exc, 'strerror', None) or exc})"
    last: Optional[OSError] = None
    for family, kind, proto, _, addr in found["addrs"]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(left)
                s.connect(addr)
                return None
        except OSError as exc:
            last = exc
    if last is None or isinstance(last, (socket.timeout, TimeoutError)):
        return f"no answer from {host}:{port} within {timeout:g} s (storage.connect_timeout_s)"
    if isinstance(last, ConnectionRefusedError):
        return f"connection refused by {host}:{port} (nothing listens there)"
    return f"cannot connect to {host}:{port} ({last.strerror or last})"


def _remove_empty_folders(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Remove the folder entries under ``path`` and ``path``'s own, deepest first, where no file is left in
    them; True when ``path`` is gone."""
    marker = path.rstrip("/") + "/"
    try:  # an empty folder lists itself as a 0-byte "folder/" object
        entries = [e for e in fs.ls(path, detail=True, refresh=True) if e["name"] != marker]
    except FileNotFoundError:
        return True
    gone = [_remove_empty_folders(fs, e["name"]) for e in entries if e.get("type") == "directory"]
    if len(gone) < len(entries) or not all(gone):
        return False  # a file is still there (written since): the folder stays
    fs.rm_file(marker)
    fs.invalidate_cache(path)
    return True


class Storage:
    """Read, write and list objects by URI. Picklable: it carries only :class:`StorageOptions`."""

    def __init__(self, options: StorageOptions | None = None):
        self.options = options or StorageOptions.from_config(None)
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}
        self._answered = False  # the S3 endpoint accepted a connection (in this process or the one that pickled us)

    def __getstate__(self) -> dict:
        return {"options": self.options, "answered": self._answered}

    def __setstate__(self, state: dict) -> None:
        self.options = state["options"]
        self._fs = {}
        self._answered = bool(state.get("answered", False))

    # ----------------------------------------------------------------- filesystems

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path inside it.

        The first S3 use checks that the endpoint answers at all (StorageError within about
        ``connect_timeout_s`` when it does not), so that botocore's and our retries, meant for a
        storage that has answered before, never spend a minute on a wrong or dead endpoint.
        """
        scheme, path = split_uri(uri)
        if scheme == "s3" and not self._answered:
            if self.endpoint() in _ANSWERED:  # another Storage of this process reached it already
                self._answered = True
            else:
                self._first_contact(uri)
        fs = self._fs.get(scheme)
        if fs is None:
            fs = self._fs[scheme] = self._make_fs(scheme)
        return fs, path

    def endpoint(self) -> str:
        """The S3 endpoint URL requests go to (the configured one, else AWS's regional one)."""
        o = self.options
        if o.endpoint_url:
            return o.endpoint_url
        return f"https://s3.{o.region}.amazonaws.com" if o.region else "https://s3.amazonaws.com"

    def _first_contact(self, uri: str) -> None:
        import urllib.parse
        import urllib.request

        url = self.endpoint()
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxies = urllib.request.getproxies()
        if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(host):
            self._answered = True  # requests go through a proxy: only the real call can tell
            return
        why = _tcp_probe(host, port, self.options.connect_timeout_s)
        if why is not None:
            hint = ("check storage.endpoint_url / AWS_ENDPOINT_URL" if self.options.endpoint_url
                    else "check the network, storage.region / AWS_REGION, or set storage.endpoint_url")
            raise StorageError(f"cannot reach storage for {uri} at {url}: {why}; {hint}")
        self._answered = True
        _ANSWERED.add(url)

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
            # botocore's own retries cover throttling (SlowDown) and dropped connections with backoff;
            # total_max_attempts counts the first try too (botocore's max_attempts would add one to it).
            "retries": {"total_max_attempts": max(1, o.retries), "mode": "adaptive"},
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
        if recursive and split_uri(uri)[0] == "s3":
            # a server with real folders (SeaweedFS) keeps the emptied folders, which listings then show
            self._call("delete", uri, lambda: _remove_empty_folders(fs, path))

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


_CACHED: dict[StorageOptions, Storage] = {}


def cached_storage(options: StorageOptions | None = None) -> Storage:
    """The one :class:`Storage` of this process for ``options`` (None: the default ``StorageOptions()``),
    made on first use.

    Stages call it on Ray workers, per batch: an S3 client costs more to make than a batch takes
    to decode, so each worker process keeps one per set of options.

    >>> cached_storage() is cached_storage()
    True
    """
    options = options or StorageOptions()
    st = _CACHED.get(options)
    if st is None:
        st = _CACHED[options] = Storage(options)
    return st
