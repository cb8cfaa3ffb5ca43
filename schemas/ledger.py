"""The commit records of a token version: ledger entries, manifests and ``version.json``.

Under ``OUTPUT/tokens/<token_version>/`` (the whole layout is in :mod:`spear.schemas.shards`)::

    ledger/<seq>-<run_id>.parquet   the objects one commit settled, one LedgerEntry each (LEDGER_SCHEMA)
    manifests/<seq>.json            one commit: every live shard and ledger file (Manifest)
    version.json                    what this token version is (VersionInfo; keyed by token_version())

A commit is a single manifest object written last (atomic on S3 and on local disk). Readers take
the highest-numbered manifest; an object's latest ledger entry says whether it is tokenised and
by which run, so rows of a killed run and the old rows of a changed object drop out without any
shard being rewritten.

Manifest version 2 names every shard and ledger file relative to ``tokens/<token_version>/``
(``shards/<run_id>/shard-<n>.parquet``), so a token dataset reads the same from any working
directory, by any spelling of its root (relative, absolute, ``~``, ``file://``, a symlink) and
after the whole folder is moved, copied or uploaded to S3 as is. Version 1 manifests (older
spear) hold the paths as the writing process spelled them (absolute, or relative to its working
directory); readers take the part after ``tokens/<token_version>/`` under the root they were
given, else the recorded path, and the next commit rewrites every name in the version 2 form.

Example::

    >>> m = Manifest(seq=3, shards=[{"file": "shards/r1/shard-0.parquet", "rows": 2, "bytes": 9, "run_id": "r1"}],
    ...              ledger_files=[ledger_name(3, "r1")], run_id="r1")
    >>> Manifest.from_json(m.to_json()).ledger_files, manifest_name(3)
    (['ledger/00000003-r1.parquet'], 'manifests/00000003.json')
    >>> tokenized_entry({"uri": "/c/a.wav", "source": "c", "domain": "speech", "etag": "1-2", "size": 9,
    ...                  "segments": 2, "audio_seconds": 3.0}, "r1")["status"]
    'tokenized'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, TypedDict

import pyarrow as pa
import pyarrow.compute as pc

from spear.schemas.catalog import CUT_URI_PREFIX
from spear.schemas.versioning import FormatError, check_version

LEDGER_SCHEMA_VERSION = 2   # 2: object_key (an object's identity wherever its source is read from)
MANIFEST_VERSION = 2   # 2: file names relative to tokens/<token_version>/ (see the module docstring)
VERSION_INFO_NAME = "version.json"
MANIFESTS_DIR = "manifests"
LEDGER_DIR = "ledger"
SHARDS_DIR = "shards"

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
    pa.field("reason", pa.string()),                     # for quarantined objects (and notes on partial ones)
    pa.field("object_key", pa.string()),                 # object_keys(); null in version 1 ledgers (source_uri is it)
], metadata={b"spear.schema": b"ledger", b"spear.version": str(LEDGER_SCHEMA_VERSION).encode()})


class LedgerEntry(TypedDict):
    """One row of :data:`LEDGER_SCHEMA`: where one source object (at one etag and size) stands."""

    source_uri: str
    source: str
    domain: str
    etag: str
    size: int
    run_id: str
    status: str                 # "tokenized" | "quarantined"
    segments: int
    audio_seconds: float
    reason: Optional[str]
    object_key: Optional[str]


def object_keys(objects: pa.Table) -> pa.Array:
    """What identifies each catalog row's object in the ledger (:mod:`spear.schemas.catalog`: ``uri``,
    ``source``, ``relative_path``), wherever its source is read from: the source's name and the path under
    the source root (a Lhotse cut: its ``lhotse-cut:<id>`` key). The same corpus reached through another
    spelling or location (a moved folder, a copy uploaded to S3) keeps its keys, so its objects replace
    their earlier rows instead of being counted, and trained on, twice: the rule of the segment ids
    (:mod:`spear.schemas.segments`). Computed in Arrow (a catalog may hold millions of cuts).

    >>> objs = pa.table({"uri": ["/data/speech/a/1.wav", "s3://b/speech/a/1.wav", "lhotse-cut:u1"],
    ...                  "source": ["speech", "speech", "cuts"], "relative_path": ["a/1.wav", "a/1.wav", "x"]})
    >>> object_keys(objs).to_pylist()
    ['speech/a/1.wav', 'speech/a/1.wav', 'lhotse-cut:u1']
    """
    uri = objects["uri"]
    by_path = pc.binary_join_element_wise(objects["source"], objects["relative_path"], "/")
    return pc.if_else(pc.starts_with(uri, CUT_URI_PREFIX), uri, by_path)


def tokenized_entry(obj: Mapping[str, Any], run_id: str, reason: Optional[str] = None,
                    key: Optional[str] = None) -> LedgerEntry:
    """The entry of an object all of whose segments ``run_id`` wrote (``obj``: a
    :class:`~spear.schemas.write_summary.WrittenObject` summed over its files); ``reason`` notes a partial one;
    ``key``: its :func:`object_keys` key."""
    return LedgerEntry(source_uri=obj["uri"], source=obj["source"], domain=obj["domain"], etag=obj["etag"],
                       size=obj["size"], run_id=run_id, status="tokenized", segments=obj["segments"],
                       audio_seconds=obj["audio_seconds"], reason=reason, object_key=key)


def quarantined_entry(q: Mapping[str, Any], run_id: str, key: Optional[str] = None) -> LedgerEntry:
    """The entry of an object ``run_id`` set aside (``q``: a :class:`~spear.schemas.quarantine.QuarantineRecord`;
    ``key``: its :func:`object_keys` key)."""
    return LedgerEntry(source_uri=q["uri"], source=q["source"], domain=q["domain"], etag=q["etag"], size=q["size"],
                       run_id=run_id, status="quarantined", segments=0, audio_seconds=0.0,
                       reason=f"{q['stage']}: {q['reason']}", object_key=key)


def ledger_keys(ledger: pa.Table) -> pa.ChunkedArray:
    """Each entry's object key: ``object_key``, or ``source_uri`` for entries written before keys existed.

    >>> t = pa.table({"source_uri": ["/c/a.wav", "/c/b.wav"], "object_key": [None, "c/b.wav"]})
    >>> ledger_keys(t).to_pylist()
    ['/c/a.wav', 'c/b.wav']
    """
    if "object_key" not in ledger.column_names:
        return ledger["source_uri"]
    return pc.coalesce(ledger["object_key"], ledger["source_uri"])


class VersionInfo(TypedDict, total=False):
    """``version.json``: what a token version is. Written whole (atomically) by tokenize when a role gets
    its codebooks; read by status, training and the next tokenize run. Older versions lack ``scheme``
    (keyed by the roles present, :data:`~spear.schemas.shards.TOKEN_VERSION_SCHEME` 1)."""

    token_version: str
    scheme: int                                       # TOKEN_VERSION_SCHEME of the key
    decode: dict[str, Any]                            # the decode settings in the key
    key: dict[str, dict[str, Any]]                    # role -> {"teacher", "num_codebooks", "codebook_size"}
    teachers: dict[str, dict[str, Any]]               # role -> its codebooks ("uri" relative to OUTPUT, "version",
                                                      # "num_codebooks", "frame_rate", ...), roles fitted so far
    teacher_fingerprints: dict[str, dict[str, Any]]   # role -> {"fingerprint", "describe"}


def ledger_name(seq: int, run_id: str) -> str:
    """The ledger file of commit ``seq``, relative to the token version root."""
    return f"{LEDGER_DIR}/{seq:08d}-{run_id}.parquet"


def manifest_name(seq: int) -> str:
    """The manifest of commit ``seq``, relative to the token version root."""
    return f"{MANIFESTS_DIR}/{seq:08d}.json"


@dataclass
class Manifest:
    """One commit of a token version: every live shard file and ledger file."""

    seq: int
    shards: list[dict]           # {"file", "rows", "bytes", "run_id"}; "file" relative to the token version root
    ledger_files: list[str]      # relative to the token version root
    created_at: float = 0.0
    run_id: str = ""
    info: dict = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION   # as read: 1 = names as the writing process spelled them

    def to_json(self) -> str:
        """The manifest as written (always the current version)."""
        return json.dumps({"manifest_version": MANIFEST_VERSION, "seq": self.seq, "shards": self.shards,
                           "ledger_files": self.ledger_files, "created_at": self.created_at, "run_id": self.run_id,
                           "info": self.info}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        """Parse a manifest of any version this spear reads; :class:`FormatError` (one line, naming ``where``)
        for a newer version or a file that is not a manifest."""
        try:
            d = json.loads(text)
            version = check_version(where, d.get("manifest_version", 1), MANIFEST_VERSION)
            return cls(seq=d["seq"], shards=d["shards"], ledger_files=d["ledger_files"],
                       created_at=d.get("created_at", 0.0), run_id=d.get("run_id", ""), info=d.get("info", {}),
                       manifest_version=version)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise FormatError(f"{where} is not a token manifest ({type(exc).__name__}: {exc})") from None
