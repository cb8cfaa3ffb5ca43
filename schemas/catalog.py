"""The catalog: one row per listed source object (the input of decode and of the ledger diff).

``etag`` is the storage's version tag: the S3 ETag, or ``<size>-<mtime_ns>`` on local disk; a
changed etag or size makes `spear tokenize` read the object again. The catalog is built in
memory on every run (:mod:`spear.stages.catalog`) and never stored as such.

Example::

    >>> CATALOG_SCHEMA.names
    ['uri', 'source', 'relative_path', 'domain', 'size', 'etag', 'mtime']
"""

from __future__ import annotations

from typing import TypedDict

import pyarrow as pa

CATALOG_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),          # source name from the corpus spec
    pa.field("relative_path", pa.string(), nullable=False),   # path under the source root
    pa.field("domain", pa.string(), nullable=False),          # "speech" | "audio"
    pa.field("size", pa.int64(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("mtime", pa.float64(), nullable=False),          # seconds since the epoch
])


class CatalogObject(TypedDict):
    """One catalog row as a dict (``catalog.objects.to_pylist()``), as the decode stage reads it."""

    uri: str
    source: str
    relative_path: str
    domain: str
    size: int
    etag: str
    mtime: float
