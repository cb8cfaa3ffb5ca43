"""Decoded segments: the rows the decode stage emits and the segment part files store.

A *segment* is a piece of at most ``decode.max_segment_seconds`` of one source object,
resampled to :data:`SAMPLE_RATE` (16 kHz) mono and stored as FLAC (PCM 16) bytes, so the
teacher stage and the token shards see exactly the same samples. Its id is stable across runs
and storages: a hash of the source name, the object's path relative to the source root, the
object's content hash and the offset.

A segment may also be one *cut* of a Lhotse manifest (:mod:`spear.stages.lhotse_source`): then
``source_uri`` is the cut's key ``lhotse-cut:<cut id>`` (what the ledger tracks), ``relative_path``
the recording's audio location, ``offset`` the cut's start in the recording (16 kHz samples), its
id hashes the cut id in place of the path, and :data:`CUT_METADATA_COLUMNS` carry the cut id and
its supervisions' speaker, language and text (null for file sources). They were added without a
version change: they are nullable and readers fill them with nulls for older files.

Two tables share the segment columns:

- :data:`SEGMENT_SCHEMA`: a stored segment (``OUTPUT/segments/part-*.parquet`` of `spear decode`,
  layout in :mod:`spear.schemas.decode_record`; token shards carry most of its columns);
- :data:`DECODED_SCHEMA`: what the decode stage hands to the next stage (never stored as such):
  the segment columns plus ``object_segments`` and the quarantine verdict, so one Arrow batch
  carries good segments and the objects that failed side by side (a failed object is one row
  with ``quarantine_reason`` set and no audio).

Example::

    >>> SEGMENT_SCHEMA.field("audio").type
    DataType(binary)
    >>> segment_id("speech", "a/b.wav", "0" * 64, 0)
    'd89403848091b609bf499fd14a14771b'
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SEGMENTS_SCHEMA_VERSION = 1

#: The rate segments are decoded to (``decode.sample_rate``'s default): the teachers and the student expect it.
SAMPLE_RATE = 16000

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
    # Lhotse cuts (null for file sources): the cut's id and its supervisions' speaker / language /
    # text (first supervision's speaker and language, all texts joined with a space).
    pa.field("cut_id", pa.string()),
    pa.field("speaker", pa.string()),
    pa.field("language", pa.string()),
    pa.field("text", pa.string()),
]

#: The nullable columns a segment cut from a Lhotse manifest fills (:mod:`spear.stages.lhotse_source`).
CUT_METADATA_COLUMNS = ("cut_id", "speaker", "language", "text")

SEGMENT_SCHEMA = pa.schema(SEGMENT_FIELDS, metadata={b"spear.schema": b"segments", b"spear.version": str(SEGMENTS_SCHEMA_VERSION).encode()})

# The decode stage's output: segment columns plus the quarantine verdict (null for good rows).
DECODED_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name == "audio" else f for f in SEGMENT_FIELDS]
    + [pa.field("object_segments", pa.int32()),  # segments of the whole object: lets writers tell when it is complete
       pa.field("quarantine_stage", pa.string()), pa.field("quarantine_reason", pa.string())]
)


def segment_id(source: str, relative_path: str, content_sha256: str, offset: int) -> str:
    """Stable id of the segment starting at sample ``offset`` of one object version (32 hex chars)."""
    key = f"{source}\x00{relative_path}\x00{content_sha256}\x00{offset}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
