"""Model artefacts on storage: checkpoints fetched into a local cache, MVQ codebooks and student
exports written and read (local paths, ``file://`` and ``s3://``).

The models (:mod:`spear.models`) take and return tensors, state dicts and local paths; the
formats (:mod:`spear.schemas.codebooks`, :mod:`spear.schemas.student_export`) turn them into
bytes and back; this module moves the bytes through :class:`~spear.cluster.storage.Storage`.

- :func:`fetch_checkpoint`: a local path is used in place; an ``s3://`` object or prefix is
  copied into a local cache first, once per version. The cache lives in
  ``$SPEAR_CACHE_DIR/teachers`` (default ``~/.cache/spear/teachers``), one folder per
  checkpoint URI; a file is fetched again when its storage ETag changes. Files are streamed to
  a temporary name and renamed, so concurrent actors on one node never read a half-written file.
- :func:`save_quantizer` / :func:`load_quantizer`: the versioned codebook artefact.
- :func:`export_student` / :func:`load_student`: a trained student as safetensors + config.json.

Example::

    >>> import tempfile, torch
    >>> from spear.models.student import build_encoder
    >>> from spear.stages.artefacts import export_student, load_student
    >>> d = tempfile.mkdtemp()
    >>> _ = export_student(build_encoder("zipformer2", "tiny", num_mel_bins=80), d, metadata={"step": 1000})
    >>> load_student(d, device="cpu").config["metadata"]
    {'step': 1000}
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
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from spear.cluster.storage import Storage, StorageError, is_remote, join_uri, split_uri
from spear.models.mvq import MultiCodebookQuantizer
from spear.models.student import StudentModel, build_student, export_fields, export_state
from spear.schemas import codebooks as codebook_format
from spear.schemas import student_export as student_format

# --------------------------------------------------------------------------- checkpoints


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


# --------------------------------------------------------------------------- MVQ codebooks


def save_quantizer(q: MultiCodebookQuantizer, uri: str, storage: Optional[Storage] = None) -> str:
    """Write ``q`` as a codebook artefact under ``uri``: the tensors, then ``meta.json`` (each object
    atomically; the metadata last marks a complete artefact). Returns :attr:`q.version`."""
    storage = storage or Storage()
    storage.write_bytes(join_uri(uri, codebook_format.TENSORS_NAME),
                        codebook_format.encode_tensors(q.codebooks, q.mean, q.std, q.version))
    storage.write_text(join_uri(uri, codebook_format.META_NAME), codebook_format.encode_meta(q.metadata))
    return q.version


def load_quantizer(uri: str, storage: Optional[Storage] = None,
                   device: Union[str, torch.device, None] = None) -> MultiCodebookQuantizer:
    """Read and verify the codebook artefact at ``uri`` (format, shapes, content hash).

    Raises :class:`~spear.schemas.codebooks.ArtefactError` (a ValueError) when it is missing,
    incomplete, corrupt or of another format version.
    """
    storage = storage or Storage()
    meta_uri, tensors_uri = join_uri(uri, codebook_format.META_NAME), join_uri(uri, codebook_format.TENSORS_NAME)
    try:
        meta = codebook_format.decode_meta(storage.read_text(meta_uri), meta_uri)
    except FileNotFoundError:
        raise codebook_format.ArtefactError(f"no MVQ codebook artefact at {uri}: {codebook_format.META_NAME} "
                                            f"is missing") from None
    try:
        blob = storage.read_bytes(tensors_uri)
    except FileNotFoundError:
        raise codebook_format.ArtefactError(f"incomplete MVQ artefact at {uri}: {codebook_format.TENSORS_NAME} "
                                            f"is missing") from None
    tensors = codebook_format.decode_tensors(blob, meta, tensors_uri)
    q = MultiCodebookQuantizer.from_state(tensors["codebooks"], tensors["mean"], tensors["std"], meta, device=device)
    if q.version != meta.get("version"):  # recomputed from the tensors and fields it now holds
        raise codebook_format.ArtefactError(
            f"MVQ artefact at {uri} fails its content hash: computed {q.version[:16]}..., "
            f"{codebook_format.META_NAME} says {str(meta.get('version'))[:16]}... (modified or mixed objects)")
    return q


# --------------------------------------------------------------------------- student exports


def export_student(model: nn.Module, path: Union[str, Path], metadata: Optional[Mapping[str, Any]] = None,
                   storage: Optional[Storage] = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write ``model``'s encoder (a ``StudentEncoder``, or e.g. a ``SpearObjective``: its
    ``.encoder``; prediction heads are not exported) to ``path``; returns the config written.

    ``metadata`` (JSON-serialisable: training step, token versions, ...) is stored as is.
    """
    storage = storage or Storage()
    blob, config = student_format.encode_export(export_state(model, dtype), export_fields(model), metadata)
    base = str(path)
    storage.makedirs(base)
    storage.write_bytes(join_uri(base, student_format.WEIGHTS_FILE), blob)
    storage.write_text(join_uri(base, student_format.CONFIG_FILE), student_format.encode_config(config))
    return config


def load_student(path: Union[str, Path], storage: Optional[Storage] = None,
                 device: Optional[Union[str, torch.device]] = None, cache_dir: Optional[str] = None) -> StudentModel:
    """Load an exported student from a local directory or an ``s3://`` prefix (cached locally), on
    ``device`` (default: CUDA if present). Weights are read with ``safetensors`` only.

    Raises FileNotFoundError when the files are missing and ValueError for a directory that
    is not a SPEAR student export (or whose weights do not match the config).
    """
    local = Path(fetch_checkpoint(str(path), storage, cache_dir, patterns=student_format.FILES))
    config, state = student_format.read_export(local, where=str(path))
    try:
        return build_student(config, state, device)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
