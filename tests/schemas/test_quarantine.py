"""Quarantine records: the stored table, partial objects, and the summary rows records travel in."""

from __future__ import annotations

import pyarrow.parquet as pq

from spear.schemas.quarantine import (PARTIAL_PREFIX, QUARANTINE_SCHEMA, is_partial, partial_reason,
                                      quarantine_record, quarantine_table)
from spear.schemas.write_summary import (WRITE_SUMMARY, WrittenObject, quarantine_records, summary_table,
                                         written_objects)

OBJ = {"uri": "/c/a.wav", "source": "c", "domain": "speech", "etag": "1-2", "size": 9}


def test_a_record_round_trips_through_the_stored_table(tmp_path):
    partial = dict(quarantine_record(OBJ, "decode", partial_reason(1.0, 2.0, "truncated")), kept_seconds=1.0)
    records = [quarantine_record(OBJ, "read", "read failed: boom"), partial]
    pq.write_table(quarantine_table(records), tmp_path / "q.parquet")
    back = pq.read_table(tmp_path / "q.parquet")
    assert back.schema.equals(QUARANTINE_SCHEMA, check_metadata=True)
    assert back.to_pylist() == [{k: r.get(k) for k in QUARANTINE_SCHEMA.names} for r in records]
    assert QUARANTINE_SCHEMA.metadata[b"spear.version"] == b"2"


def test_records_without_a_size_are_those_of_unlisted_prefixes():
    q = quarantine_record({"uri": "/gone", "source": "g", "domain": "audio", "etag": ""}, "catalog", "prefix does not exist")
    assert list(q) == ["uri", "source", "domain", "etag", "stage", "reason"]
    assert list(quarantine_record(OBJ, "read", "x")) == ["uri", "source", "domain", "etag", "size", "stage", "reason"]


def test_partial_objects_are_told_by_stage_and_prefix():
    reason = partial_reason(3.2, None, "corrupt audio")
    assert reason == "partial: kept 3.2 s (whole length unknown): corrupt audio" and reason.startswith(PARTIAL_PREFIX)
    assert is_partial({"stage": "decode", "reason": reason})
    assert not is_partial({"stage": "read", "reason": reason})
    assert not is_partial({"stage": "decode", "reason": "corrupt audio"}) and not is_partial({"stage": "decode"})


def test_summary_rows_carry_objects_and_records_unchanged():
    obj = WrittenObject(uri="/c/a.wav", source="c", domain="speech", etag="1-2", size=9, segments=1,
                        object_segments=3, audio_seconds=2.0)
    q = quarantine_record(OBJ, "teacher", "out of memory")
    table = summary_table("/o/part-1.parquet", rows=1, size=50, audio_seconds=2.0, objects=[obj], quarantine=[q])
    assert table.schema.equals(WRITE_SUMMARY)
    (row,) = table.to_pylist()
    assert written_objects(row) == [obj] and quarantine_records(row) == [q]
    empty = summary_table("", rows=0, size=0, audio_seconds=0.0, objects=[], quarantine=[]).to_pylist()[0]
    assert written_objects(empty) == [] and quarantine_records(empty) == []
