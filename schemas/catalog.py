"""The catalog: one row per listed source object (the input of decode and of the ledger diff).

``etag`` is the storage's version tag: the S3 ETag, or ``<size>-<mtime_ns>`` on local disk; a
changed etag or size makes `spear tokenize` read the object again. The catalog is built in
memory on every run (:mod:`spear.stages.catalog`) and never stored as such.

A row may also be one cut of a Lhotse manifest or Shar directory (:mod:`spear.stages.lhotse_source`):
then ``uri`` is the cut's key ``lhotse-cut:<cut id>`` (the ledger tracks cuts by it, whichever
manifest lists them), ``etag`` a hash of what the cut takes from its recording (audio source,
offset, duration, channels), ``size`` the cut's length as 16-bit PCM bytes at 16 kHz, and the
``cut_*`` columns say what to decode; the cut columns are null on file rows.

Example::

    >>> CATALOG_SCHEMA.names[:7]
    ['uri', 'source', 'relative_path', 'domain', 'size', 'etag', 'mtime']
    >>> CATALOG_SCHEMA.names[7:]
    ['cut_id', 'audio_uri', 'cut_manifest', 'cut_start', 'cut_duration', 'cut_channels', 'speaker', 'language', 'text']
"""

from __future__ import annotations

from typing import Optional, TypedDict

import pyarrow as pa

CATALOG_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),          # source name from the corpus spec
    pa.field("relative_path", pa.string(), nullable=False),   # path under the source root
    pa.field("domain", pa.string(), nullable=False),          # "speech" | "audio"
    pa.field("size", pa.int64(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("mtime", pa.float64(), nullable=False),          # seconds since the epoch
    # Lhotse cuts only (null on file rows):
    pa.field("cut_id", pa.string()),
    pa.field("audio_uri", pa.string()),                       # the recording's audio file, or the Shar tar shard
    pa.field("cut_manifest", pa.string()),                    # the manifest (or Shar cuts shard) listing the cut
    pa.field("cut_start", pa.float64()),                      # seconds into audio_uri's audio
    pa.field("cut_duration", pa.float64()),                   # seconds
    pa.field("cut_channels", pa.list_(pa.int32())),           # channel positions in the audio file to average; null: all
    pa.field("speaker", pa.string()),                         # first supervision's speaker
    pa.field("language", pa.string()),                        # first supervision's language
    pa.field("text", pa.string()),                            # the supervisions' texts joined with a space
])

#: The catalog's key prefix of a Lhotse cut: ``lhotse-cut:<cut id>``.
CUT_URI_PREFIX = "lhotse-cut:"


def cut_uri(cut_id: str) -> str:
    """The catalog (and ledger) key of a cut: the same whichever manifest or source lists it.

    >>> cut_uri("spk1-utt3")
    'lhotse-cut:spk1-utt3'
    """
    return CUT_URI_PREFIX + cut_id


class CatalogObject(TypedDict):
    """One catalog row as a dict (``catalog.objects.to_pylist()``), as the decode stage reads it."""

    uri: str
    source: str
    relative_path: str
    domain: str
    size: int
    etag: str
    mtime: float
    cut_id: Optional[str]
    audio_uri: Optional[str]
    cut_manifest: Optional[str]
    cut_start: Optional[float]
    cut_duration: Optional[float]
    cut_channels: Optional[list[int]]
    speaker: Optional[str]
    language: Optional[str]
    text: Optional[str]
