"""The output of `spear decode` and its commit record, ``decode.json``.

Layout under OUTPUT::

    segments/part-<id>.parquet   16 kHz FLAC segments (SEGMENT_SCHEMA, spear.schemas.segments)
    quarantine.parquet           objects that were skipped, with the stage and reason (QUARANTINE_SCHEMA)
    decode.json                  the commit record (:class:`DecodeRecord`): summary and the part files

``decode.json`` is written last: a run that dies leaves none, and readers see nothing half-done.

Version 2 of the record names its part files relative to OUTPUT (``segments/part-<id>.parquet``),
so a decode output reads the same from any working directory and after being moved, copied or
uploaded as is; version 1 (older spear) held them as the writing process spelled them, and
readers take the part from ``segments/`` on under the root they are given.

Example::

    >>> r = DecodeRecord(files=["segments/part-1.parquet"], summary={"segments": 3}, decode_config={}, sources=[])
    >>> DecodeRecord.from_json(r.to_json()).files
    ['segments/part-1.parquet']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from spear.schemas.segments import SEGMENTS_SCHEMA_VERSION
from spear.schemas.versioning import FormatError, check_kind, check_version, parse_json_object

DECODE_RECORD_NAME = "decode.json"
SEGMENTS_DIR = "segments"
QUARANTINE_NAME = "quarantine.parquet"
DECODE_RECORD_KIND = "spear.decode"
DECODE_RECORD_VERSION = 2   # 2: part files named relative to OUTPUT (see the module docstring)


@dataclass
class DecodeRecord:
    """``decode.json``: the committed part files and what the run did.

    ``files`` are the names as recorded (relative to OUTPUT from version 2 on); ``summary`` is the
    job's ``--json`` summary, ``decode_config`` the decode settings and ``sources`` the corpus sources.
    """

    files: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    decode_config: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    record_version: int = DECODE_RECORD_VERSION   # as read: 1 = names as the writing process spelled them
    schema_version: int = SEGMENTS_SCHEMA_VERSION

    def to_json(self) -> str:
        """The record as written (always the current version)."""
        return json.dumps({"kind": DECODE_RECORD_KIND, "schema_version": SEGMENTS_SCHEMA_VERSION,
                           "record_version": DECODE_RECORD_VERSION, "files": self.files, "summary": self.summary,
                           "decode_config": self.decode_config, "sources": self.sources}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = DECODE_RECORD_NAME) -> "DecodeRecord":
        """Parse a record of any version this spear reads; :class:`FormatError` (one line, naming ``where``)
        for another kind of file or a newer version."""
        what = f"decode record {where}"
        d = parse_json_object(what, text)
        check_kind(what, d.get("kind"), DECODE_RECORD_KIND)
        record_version = check_version(what, d.get("record_version", 1), DECODE_RECORD_VERSION)
        schema_version = check_version(f"the segments of {what}", d.get("schema_version", 1), SEGMENTS_SCHEMA_VERSION)
        if not isinstance(d.get("files"), list):
            raise FormatError(f"{what} has no list of files")
        return cls(files=list(d["files"]), summary=d.get("summary", {}), decode_config=d.get("decode_config", {}),
                   sources=d.get("sources", []), record_version=record_version, schema_version=schema_version)
