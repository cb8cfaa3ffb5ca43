"""Catalog stage: list every audio object of the corpus sources into one Arrow table.

Each row is one object (:data:`~spear.schemas.catalog.CATALOG_SCHEMA`): its URI, source name
and domain, path relative to the source root, size, etag (S3 ETag, or size+mtime on local
disk) and mtime. A prefix that cannot be read is not fatal: it becomes a quarantine record
and the other sources go on. A source that is a Lhotse CutSet manifest or Shar directory
lists one row per cut instead (:mod:`spear.stages.lhotse_source`).

Example::

    >>> from spear.config import SourceConfig
    >>> cat = build_catalog([SourceConfig(uri="/data/speech", domain="speech")])   # doctest: +SKIP
    >>> cat.objects.column_names
    ['uri', 'source', 'relative_path', 'domain', 'size', 'etag', 'mtime']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa

from spear.cluster.storage import FileEntry, Storage, StorageError, split_uri
from spear.schemas.catalog import CATALOG_SCHEMA
from spear.schemas.quarantine import QuarantineRecord, quarantine_record
from spear.stages.lhotse_source import CUT_COLUMNS, drop_duplicate_cuts, list_cuts, source_format

@dataclass
class Catalog:
    """Listed objects (CATALOG_SCHEMA) plus the prefixes that could not be listed (stage ``catalog``)."""

    objects: pa.Table
    unreadable: list[QuarantineRecord] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        return self.objects.num_rows

    @property
    def total_bytes(self) -> int:
        return int(pa.compute.sum(self.objects["size"]).as_py() or 0) if self.objects.num_rows else 0


def _walk_local(root: str, extensions: set[str]) -> tuple[list[FileEntry], list[tuple[str, str]]]:
    """os.walk that records unreadable directories instead of failing (fsspec's find would raise)."""
    errors: list[tuple[str, str]] = []
    if os.path.isfile(root):
        st = os.stat(root)
        return [FileEntry(root, st.st_size, f"{st.st_size}-{st.st_mtime_ns}", st.st_mtime)], errors
    if not os.path.isdir(root):
        return [], [(root, "prefix does not exist")]
    entries: list[FileEntry] = []

    def onerror(exc: OSError) -> None:
        errors.append((exc.filename or root, f"unreadable prefix: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        for name in sorted(filenames):
            if name.rsplit(".", 1)[-1].lower() not in extensions or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as exc:
                # a dangling link or a file that vanished while listing: decode will quarantine it
                entries.append(FileEntry(path, 0, f"missing-{exc.errno}", 0.0))
                continue
            entries.append(FileEntry(path, st.st_size, f"{st.st_size}-{st.st_mtime_ns}", st.st_mtime))
    return entries, errors


def _relative(root: str, uri: str) -> str:
    _, root_path = split_uri(root)
    _, path = split_uri(uri)
    if path == root_path:
        return os.path.basename(path)
    return path[len(root_path.rstrip("/")) + 1:]


def build_catalog(sources: Sequence, storage: Storage | None = None) -> Catalog:
    """List all sources (each a :class:`~spear.config.SourceConfig`).

    Raises :class:`StorageError` when storage is unreachable or denies access (fail fast);
    a prefix that does not exist or cannot be read is recorded in ``Catalog.unreadable``.
    """
    storage = storage or Storage()
    tables: list[pa.Table] = []          # one per source, in the sources' order (the first listing of a cut wins)
    unreadable: list[QuarantineRecord] = []
    seen: set[str] = set()
    cuts_listed = False
    for src in sources:
        if source_format(src, storage) != "files":
            cuts_listed = True
            # a Lhotse manifest or Shar directory: one row per cut (stages/lhotse_source.py)
            cut_rows, bad = list_cuts(src, storage)
            tables.append(cut_rows)
            unreadable.extend(bad)
            continue
        exts = {e.lower() for e in src.extensions}
        scheme, path = split_uri(src.uri)
        if scheme == "file":
            entries, errors = _walk_local(path, exts)
            root = path
        else:
            root = src.uri
            storage.check_access(src.uri)  # unreachable endpoint / bad credentials: fail fast
            try:
                entries, errors = storage.list_files(src.uri, exts), []
            except StorageError as exc:
                entries, errors = [], [(src.uri, f"unreadable prefix: {exc}")]
        for uri, reason in errors:
            unreadable.append(quarantine_record({"uri": uri, "source": src.source_name, "domain": src.domain,
                                                 "etag": ""}, "catalog", reason))
        rows: dict[str, list] = {name: [] for name in CATALOG_SCHEMA.names}
        for e in entries:
            if e.uri in seen:  # overlapping sources: the first one wins
                continue
            seen.add(e.uri)
            rows["uri"].append(e.uri)
            rows["source"].append(src.source_name)
            rows["relative_path"].append(_relative(root, e.uri))
            rows["domain"].append(src.domain)
            rows["size"].append(e.size)
            rows["etag"].append(e.etag)
            rows["mtime"].append(e.mtime)
        n = len(rows["uri"])
        for name in CUT_COLUMNS:
            rows[name] = pa.nulls(n, CATALOG_SCHEMA.field(name).type)
        tables.append(pa.table(rows, schema=CATALOG_SCHEMA))
    objects = pa.concat_tables(tables) if tables else CATALOG_SCHEMA.empty_table()
    if cuts_listed:
        # a cut id listed twice (in one manifest, or by several): the first wins, the others are set aside
        objects, dups = drop_duplicate_cuts(objects)
        unreadable.extend(dups)
    return Catalog(objects, unreadable)
