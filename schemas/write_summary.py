"""The writer's summary: one row per Parquet file a writer task wrote, for the driver to commit by.

A row names the file (empty when every row of the batch was quarantined), its rows, bytes and
audio seconds, the objects it holds segments of (:class:`WrittenObject`: how many of the
object's segments are in this file, and how many it has in all) and the objects the batch
set aside (:class:`~spear.schemas.quarantine.QuarantineRecord`). Both lists travel as JSON
strings, so the summary is a flat Arrow table whatever the records hold. It is never stored.

Example::

    >>> t = summary_table("/out/segments/part-1.parquet", rows=2, size=100, audio_seconds=3.0,
    ...                   objects=[WrittenObject(uri="/c/a.wav", source="c", domain="speech", etag="1-2", size=9,
    ...                                          segments=2, object_segments=2, audio_seconds=3.0)], quarantine=[])
    >>> row = t.to_pylist()[0]
    >>> written_objects(row)[0]["segments"], quarantine_records(row)
    (2, [])
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence, TypedDict

import pyarrow as pa

from spear.schemas.quarantine import QuarantineRecord

WRITE_SUMMARY = pa.schema([
    pa.field("file", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("bytes", pa.int64()),
    pa.field("audio_seconds", pa.float64()),
    pa.field("objects", pa.list_(pa.string())),     # JSON of WrittenObject
    pa.field("quarantine", pa.list_(pa.string())),  # JSON of QuarantineRecord
])


class WrittenObject(TypedDict):
    """The part of one source object a file holds: ``segments`` of its ``object_segments``."""

    uri: str
    source: str
    domain: str
    etag: str
    size: int
    segments: int
    object_segments: int
    audio_seconds: float


def summary_table(file: str, *, rows: int, size: int, audio_seconds: float, objects: Sequence[WrittenObject],
                  quarantine: Sequence[QuarantineRecord]) -> pa.Table:
    """The one-row :data:`WRITE_SUMMARY` table of one written file."""
    return pa.table({"file": [file], "rows": [rows], "bytes": [size], "audio_seconds": [audio_seconds],
                     "objects": [[json.dumps(o) for o in objects]], "quarantine": [[json.dumps(q) for q in quarantine]]},
                    schema=WRITE_SUMMARY)


def written_objects(row: Mapping[str, Any]) -> list[WrittenObject]:
    """The objects of one summary row (a dict of ``WRITE_SUMMARY``)."""
    return [json.loads(text) for text in row["objects"]]


def quarantine_records(row: Mapping[str, Any]) -> list[QuarantineRecord]:
    """The quarantine records of one summary row."""
    return [json.loads(text) for text in row["quarantine"]]
