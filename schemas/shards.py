"""Token shards, token versions and the commit records (manifests + ledger).

A token shard is a Parquet file, one row per segment: the segment's identity and 16 kHz
FLAC audio (so training reads one sequential stream) and, per teacher, its MVQ tokens as
raw uint8 bytes (frames x codebooks, row-major), the frame count, frame rate and codebook
version. Token columns are plain binary, never dictionary-encoded or compressed (they are
incompressible and read at memory speed that way). Speech-domain rows have no audio-teacher
tokens (null): the asymmetric loss ignores them.

Layout of a token dataset under OUTPUT::

    codebooks/<role>-<teacher_version[:16]>-<M>x<K>/  MVQ artefacts (one per teacher version and shape)
    tokens/<token_version>/
        shards/<run_id>/shard-<n>.parquet           written by workers; visible only once committed
        ledger/<seq>-<run_id>.parquet               objects committed by one commit (LEDGER_SCHEMA)
        manifests/<seq>.json                        one commit: every live shard + ledger file
        version.json                                what this token version is (teachers, codebooks)

A commit is a single manifest object written last (atomic on S3 and on local disk). Readers
take the highest-numbered manifest; rows count only if their object's ledger entry names
their run, so partial objects of a killed run and superseded versions of changed objects
are never read.

Manifest version 2 names every shard and ledger file relative to ``tokens/<token_version>/``
(``shards/<run_id>/shard-<n>.parquet``), so a token dataset reads the same from any working
directory, by any spelling of its root (relative, absolute, ``~``, ``file://``, a symlink) and after
the whole folder is moved, copied or uploaded to S3 as is. Version 1 manifests (older spear) hold
the paths as the writing process spelled them (absolute, or relative to its working directory);
readers take the part after ``tokens/<token_version>/`` under the root they were given, else the
recorded path, and the next commit rewrites every name in the version 2 form.

Example::

    >>> from spear.schemas.shards import token_shard_schema
    >>> token_shard_schema(["speech", "audio"]).field("speech_tokens").type
    DataType(binary)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import pyarrow as pa

from spear.schemas.segments import SEGMENT_FIELDS, SEGMENTS_SCHEMA_VERSION

TOKEN_SHARD_SCHEMA_VERSION = 1
MANIFEST_VERSION = 2   # 2: file names relative to tokens/<token_version>/ (see the module docstring)

TEACHER_ROLES = ("speech", "audio")

# segment columns carried into shards (everything but the source format details)
_SEGMENT_COLUMNS = ["segment_id", "source", "source_uri", "relative_path", "source_etag", "source_size",
                    "content_sha256", "domain", "offset", "num_samples", "duration", "sample_rate", "audio"]


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


LEDGER_SCHEMA = pa.schema([
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),     # the run whose rows are the object's live rows
    pa.field("status", pa.string(), nullable=False),     # "tokenized" | "quarantined"
    pa.field("segments", pa.int64(), nullable=False),
    pa.field("audio_seconds", pa.float64(), nullable=False),
    pa.field("reason", pa.string()),                     # for quarantined objects
], metadata={b"spear.schema": b"ledger", b"spear.version": b"1"})


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
