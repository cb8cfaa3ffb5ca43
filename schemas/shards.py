"""Token shards and token versions: what `spear tokenize` writes and training reads.

A token shard is a Parquet file, one row per segment: the segment's identity and 16 kHz
FLAC audio (so training reads one sequential stream) and, per teacher, its MVQ tokens as
raw uint8 bytes (frames x codebooks, row-major), the frame count, frame rate and codebook
version. Token columns are plain binary, never dictionary-encoded or compressed (they are
incompressible and read at memory speed that way). Speech-domain rows have no audio-teacher
tokens (null): the asymmetric loss ignores them.

Layout of a token dataset under OUTPUT::

    codebooks/<role>-<teacher_version[:16]>-<M>x<K>/   one MVQ artefact per teacher role, version and shape
        codebooks.safetensors, meta.json           the artefact (meta.json written last marks it complete)
        usage.png                                  codebook usage on held-out frames (codebooks fitted by tokenize)
    tokens/<token_version>/
        shards/<run_id>/shard-<id>.parquet         written by workers; visible only once committed
        ledger/<seq>-<run_id>.parquet              objects committed by one commit (LEDGER_SCHEMA)
        manifests/<seq>.json                       one commit: every live shard + ledger file
        version.json                               what this token version is (teachers, codebooks)

``<seq>`` is the commit number in 8 digits, ``<id>`` 16 random hex digits. The commit records
(ledger entries, manifests, ``version.json``) and how readers find the live rows are in
:mod:`spear.schemas.ledger`.

Example::

    >>> from spear.schemas.shards import token_shard_schema
    >>> token_shard_schema(["speech", "audio"]).field("speech_tokens").type
    DataType(binary)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from spear.schemas.segments import CUT_METADATA_COLUMNS, SEGMENT_FIELDS, SEGMENTS_SCHEMA_VERSION

TOKEN_SHARD_SCHEMA_VERSION = 1

TEACHER_ROLES = ("speech", "audio")

# segment columns carried into shards (everything but the source format details)
_SEGMENT_COLUMNS = ["segment_id", "source", "source_uri", "relative_path", "source_etag", "source_size",
                    "content_sha256", "domain", "offset", "num_samples", "duration", "sample_rate", "audio",
                    *CUT_METADATA_COLUMNS]


def token_columns(role: str) -> list[pa.Field]:
    return [
        pa.field(f"{role}_tokens", pa.binary()),           # uint8 [num_frames, num_codebooks], row-major
        pa.field(f"{role}_num_frames", pa.int32()),
        pa.field(f"{role}_num_codebooks", pa.int16()),
        pa.field(f"{role}_frame_rate", pa.float32()),
        pa.field(f"{role}_codebook", pa.string()),         # codebook (MVQ artefact) version
    ]


def token_shard_schema(roles: Sequence[str] = TEACHER_ROLES) -> pa.Schema:
    seg = {f.name: f for f in SEGMENT_FIELDS}
    fields = [seg[c] for c in _SEGMENT_COLUMNS] + [pa.field("run_id", pa.string(), nullable=False)]
    for role in roles:
        fields += token_columns(role)
    return pa.schema(fields, metadata={b"spear.schema": b"token_shard",
                                       b"spear.version": str(TOKEN_SHARD_SCHEMA_VERSION).encode()})


def with_cut_metadata(table: pa.Table, columns: Sequence[str] | None = None) -> pa.Table:
    """``table`` with the cut metadata columns (:data:`~spear.schemas.segments.CUT_METADATA_COLUMNS`) it
    lacks added as nulls: token shards written before Lhotse sources existed have none of them.
    ``columns``: only those of them (None: all four).

    >>> with_cut_metadata(pa.table({"segment_id": ["a"]})).column_names
    ['segment_id', 'cut_id', 'speaker', 'language', 'text']
    """
    for name in (CUT_METADATA_COLUMNS if columns is None else [c for c in columns if c in CUT_METADATA_COLUMNS]):
        if name not in table.column_names:
            table = table.append_column(pa.field(name, pa.string()), pa.nulls(table.num_rows, pa.string()))
    return table


# 1: keyed by the codebooks of the roles present (forked when a domain arrived); 2: keyed by the
# configured roles, codebooks fitted lazily per role.
TOKEN_VERSION_SCHEME = 2


def token_version(decode_settings: dict[str, Any], teachers: dict[str, dict[str, Any]]) -> str:
    """The id of a token dataset: changes with any decode setting, teacher version or codebook shape.

    ``teachers`` maps every *configured* role, whether or not its domain has data yet, to
    {"teacher": teacher version, "num_codebooks": M, "codebook_size": K}. A role's codebooks are
    fitted the first time it has data and then fixed for the version (one artefact per teacher
    version and shape under ``OUTPUT/codebooks``; ``version.json`` records it), so adding
    audio-domain data extends the dataset, while a new teacher, layer or codebook shape makes a
    new version. ``version.json`` holds ``scheme``, ``key`` (this mapping), ``teachers`` (role ->
    codebooks, for the roles fitted so far) and ``teacher_fingerprints``; it is rewritten whole
    (atomically) when a role gets its codebooks.
    """
    payload = {"scheme": TOKEN_VERSION_SCHEME, "segments_schema": SEGMENTS_SCHEMA_VERSION,
               "shard_schema": TOKEN_SHARD_SCHEMA_VERSION, "decode": decode_settings, "teachers": teachers}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"tv-{digest[:16]}"


def decode_tokens(data: bytes | None, num_frames: int | None, num_codebooks: int | None) -> np.ndarray | None:
    """Raw token bytes of one segment -> uint8 [frames, codebooks] (None if absent)."""
    if data is None or num_frames is None or num_codebooks is None:
        return None
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size != int(num_frames) * int(num_codebooks):
        raise ValueError(f"token bytes ({arr.size}) != frames x codebooks ({num_frames} x {num_codebooks})")
    return arr.reshape(int(num_frames), int(num_codebooks))
