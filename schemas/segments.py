"""Decoded segments and quarantine records: the rows the decode stage emits.

A *segment* is a piece of at most ``decode.max_segment_seconds`` of one source object,
resampled to 16 kHz mono and stored as FLAC (PCM 16) bytes, so the teacher stage and the
token shards see exactly the same samples. Its id is stable across runs and storages:
a hash of the source name, the object's path relative to the source root, the object's
content hash and the offset.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SEGMENTS_SCHEMA_VERSION = 1

# The decode commit record (OUTPUT/decode.json). Version 2 names its part files relative to OUTPUT
# ("segments/part-<id>.parquet"), so a decode output reads the same from any working directory and
# after being moved, copied or uploaded as is; version 1 (older spear) held them as the writing
# process spelled them, and readers take the part from "segments/" on under the root they are given.
DECODE_RECORD_VERSION = 2

SEGMENT_FIELDS = [
    pa.field("segment_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),          # source name from the corpus spec
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("relative_path", pa.string(), nullable=False),   # path under the source root
    pa.field("source_etag", pa.string(), nullable=False),     # storage version tag from the listing
    pa.field("source_size", pa.int64(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),          # "speech" | "audio"
    pa.field("offset", pa.int64(), nullable=False),           # first sample, at sample_rate
    pa.field("num_samples", pa.int64(), nullable=False),
    pa.field("duration", pa.float64(), nullable=False),       # seconds
    pa.field("sample_rate", pa.int32(), nullable=False),
    pa.field("audio", pa.binary(), nullable=False),           # FLAC, PCM_16, mono
    pa.field("source_sample_rate", pa.int32(), nullable=False),
    pa.field("source_channels", pa.int16(), nullable=False),
    pa.field("source_format", pa.string(), nullable=False),
]

SEGMENT_SCHEMA = pa.schema(SEGMENT_FIELDS, metadata={b"spear.schema": b"segments", b"spear.version": str(SEGMENTS_SCHEMA_VERSION).encode()})

QUARANTINE_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),   # "catalog" | "read" | "decode" | ...
    pa.field("reason", pa.string(), nullable=False),  # "partial: kept ..." when the decodable part was kept
    pa.field("kept_seconds", pa.float64(), nullable=True),  # seconds kept of a partial object; null when none
], metadata={b"spear.schema": b"quarantine", b"spear.version": b"2"})


def segment_id(source: str, relative_path: str, content_sha256: str, offset: int) -> str:
    """Stable id of the segment starting at sample ``offset`` of one object version (32 hex chars)."""
    key = f"{source}\x00{relative_path}\x00{content_sha256}\x00{offset}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
