"""Checkpoint locations: a local path is used in place; an ``s3://`` object or prefix is copied
into a local cache first (through :class:`~spear.cluster.storage.Storage`), once per version.

The cache lives in ``$SPEAR_CACHE_DIR/teachers`` (default ``~/.cache/spear/teachers``), one
folder per checkpoint URI; a file is fetched again when its storage ETag changes. Files are
streamed to a temporary name and renamed, so concurrent actors on one node never read a
half-written file.

Example::

    >>> from spear.models.teachers.checkpoint import fetch_checkpoint
    >>> local_dir = fetch_checkpoint("s3://models/wavlm-large/", storage)  # doctest: +SKIP
    >>> sorted(p.name for p in local_dir.iterdir())  # doctest: +SKIP
    ['config.json', 'config.json.etag', 'model.safetensors', 'model.safetensors.etag']
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterable

from spear.cluster.storage import Storage, StorageError, is_remote, split_uri


def default_cache_dir() -> Path:
    root = os.environ.get("SPEAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
    return Path(root) / "teachers"


def fetch_checkpoint(path: str, storage: Storage | None = None, cache_dir: str | os.PathLike | None = None,
                     patterns: Iterable[str] = ("*",)) -> Path:
    """Local path of the checkpoint file or directory at ``path`` (local, file:// or s3://).

    For a remote prefix, only files whose name matches one of ``patterns`` are fetched.
    Raises FileNotFoundError when nothing is there, StorageError when storage fails.
    """
    if not is_remote(path):
        local = Path(split_uri(path)[1])
        if not local.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return local
    storage = storage or Storage()
    base = path.rstrip("/")
    entries = storage.list_files(base)  # a single object lists itself
    if not entries:
        raise FileNotFoundError(f"checkpoint {path}: nothing stored there")
    single = len(entries) == 1 and entries[0].uri.rstrip("/") == base
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    target = target / hashlib.sha256(base.encode()).hexdigest()[:16]
    pats = tuple(patterns)
    fetched = 0
    for e in entries:
        rel = Path(e.uri).name if single else e.uri[len(base):].lstrip("/")
        if not single and not any(fnmatch.fnmatch(Path(rel).name, p) for p in pats):
            continue
        _fetch_file(storage, e.uri, e.etag, e.size, target / rel)
        fetched += 1
    if not fetched:
        raise FileNotFoundError(f"checkpoint {path}: no file matching {list(pats)}")
    return target / Path(entries[0].uri).name if single else target


def _fetch_file(storage: Storage, uri: str, etag: str, size: int, dest: Path) -> None:
    stamp = dest.with_name(dest.name + ".etag")
    if dest.exists() and stamp.exists() and stamp.read_text() == f"{etag}:{size}" and dest.stat().st_size == size:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fs, rpath = storage.filesystem(uri)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fs.get_file(rpath, str(tmp))  # streamed: a multi-GB checkpoint never sits in memory whole
        if tmp.stat().st_size != size:
            raise StorageError(f"fetching {uri}: got {tmp.stat().st_size} bytes, expected {size}")
        os.replace(tmp, dest)
        stamp.write_text(f"{etag}:{size}")
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any transport failure becomes a StorageError naming the object
        raise StorageError(f"failed to fetch {uri} into {dest}: {type(exc).__name__}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of files (sorted by name), read in 8 MiB blocks."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()
