"""Segments, the catalog and the decoded rows: schemas, ids and the sample rate."""

from __future__ import annotations

import pyarrow as pa

from spear.config import DecodeConfig
from spear.schemas.catalog import CATALOG_SCHEMA
from spear.schemas.segments import (DECODED_SCHEMA, SAMPLE_RATE, SEGMENT_FIELDS, SEGMENT_SCHEMA,
                                    SEGMENTS_SCHEMA_VERSION, segment_id)
from spear.schemas.shards import token_shard_schema


def test_segment_schema_carries_its_name_and_version():
    meta = SEGMENT_SCHEMA.metadata
    assert meta[b"spear.schema"] == b"segments" and int(meta[b"spear.version"]) == SEGMENTS_SCHEMA_VERSION
    assert [f.name for f in SEGMENT_FIELDS] == SEGMENT_SCHEMA.names


def test_decoded_rows_are_segments_plus_the_verdict_with_room_for_a_failed_object():
    assert DECODED_SCHEMA.names[:len(SEGMENT_FIELDS)] == SEGMENT_SCHEMA.names
    assert DECODED_SCHEMA.names[len(SEGMENT_FIELDS):] == ["object_segments", "quarantine_stage", "quarantine_reason"]
    assert DECODED_SCHEMA.field("audio").nullable and not SEGMENT_SCHEMA.field("audio").nullable


def test_a_segment_round_trips_through_parquet(tmp_path):
    import pyarrow.parquet as pq

    row = {"segment_id": segment_id("c", "a.wav", "ab" * 32, 0), "source": "c", "source_uri": "/c/a.wav",
           "relative_path": "a.wav", "source_etag": "1-2", "source_size": 9, "content_sha256": "ab" * 32,
           "domain": "speech", "offset": 0, "num_samples": 16, "duration": 0.001, "sample_rate": SAMPLE_RATE,
           "audio": b"fLaC", "source_sample_rate": 44100, "source_channels": 2, "source_format": "WAV",
           "cut_id": None, "speaker": None, "language": None, "text": None}
    pq.write_table(pa.Table.from_pylist([row], schema=SEGMENT_SCHEMA), tmp_path / "p.parquet")
    back = pq.read_table(tmp_path / "p.parquet")
    assert back.schema.equals(SEGMENT_SCHEMA, check_metadata=True) and back.to_pylist() == [row]


def test_segment_ids_are_stable_and_tell_every_part_apart():
    sid = segment_id("c", "a/b.wav", "0" * 64, 0)
    assert sid == "071a90d97274134cf710e0f5ebfa7d35"   # fixed forever: ids name segments across runs and storages
    others = {segment_id("d", "a/b.wav", "0" * 64, 0), segment_id("c", "a/c.wav", "0" * 64, 0),
              segment_id("c", "a/b.wav", "1" * 64, 0), segment_id("c", "a/b.wav", "0" * 64, 1)}
    assert len(others | {sid}) == 5


def test_the_sample_rate_is_the_decode_default():
    assert SAMPLE_RATE == DecodeConfig().sample_rate == 16000


def test_catalog_and_shards_keep_the_segment_identity_columns():
    assert CATALOG_SCHEMA.names[:7] == ["uri", "source", "relative_path", "domain", "size", "etag", "mtime"]
    # a cut's columns are nullable (null on file rows), in the catalog, the segments and the token shards
    assert all(CATALOG_SCHEMA.field(c).nullable for c in CATALOG_SCHEMA.names[7:])
    shard = token_shard_schema(["speech", "audio"])
    for name in ("segment_id", "source_uri", "source_etag", "domain", "audio", "sample_rate"):
        assert shard.field(name) == SEGMENT_SCHEMA.field(name)
    assert shard.metadata[b"spear.schema"] == b"token_shard"
    for name in ("cut_id", "speaker", "language", "text"):
        assert shard.field(name) == SEGMENT_SCHEMA.field(name) == CATALOG_SCHEMA.field(name)
        assert shard.field(name).nullable and shard.field(name).type == pa.string()
