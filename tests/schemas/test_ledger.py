"""Ledger entries and manifests of a token version: round trip, version checks, one-line errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from spear.schemas.ledger import (LEDGER_SCHEMA, MANIFEST_VERSION, Manifest, ledger_name, manifest_name,
                                  quarantined_entry, tokenized_entry)
from spear.schemas.shards import decode_tokens, token_version
from spear.schemas.versioning import FormatError

OBJ = {"uri": "/c/a.wav", "source": "c", "domain": "speech", "etag": "1-2", "size": 9, "segments": 2,
       "audio_seconds": 3.0, "object_segments": 2}


def test_entries_fill_the_ledger_schema():
    rows = [tokenized_entry(OBJ, "r1"), tokenized_entry(OBJ, "r1", "decode: partial: kept 1.0 s"),
            quarantined_entry({**OBJ, "stage": "decode", "reason": "corrupt audio"}, "r1")]
    table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
    assert table.to_pylist() == rows
    assert [r["status"] for r in rows] == ["tokenized", "tokenized", "quarantined"]
    assert rows[2]["reason"] == "decode: corrupt audio" and (rows[2]["segments"], rows[2]["audio_seconds"]) == (0, 0.0)
    assert list(rows[0]) == LEDGER_SCHEMA.names


def test_manifest_round_trip_and_names():
    m = Manifest(seq=12, shards=[{"file": "shards/r/shard-0.parquet", "rows": 1, "bytes": 2, "run_id": "r"}],
                 ledger_files=[ledger_name(12, "r")], created_at=1.5, run_id="r", info={"final": True})
    d = json.loads(m.to_json())
    assert d["manifest_version"] == MANIFEST_VERSION == 2
    assert Manifest.from_json(m.to_json()) == m
    assert manifest_name(12) == "manifests/00000012.json" and ledger_name(12, "r") == "ledger/00000012-r.parquet"


def test_a_version_1_manifest_reads():
    d = {"seq": 1, "shards": [{"file": "/abs/tokens/tv/shards/r/shard-0.parquet"}], "ledger_files": []}
    m = Manifest.from_json(json.dumps(d))
    assert m.manifest_version == 1 and m.run_id == "" and m.info == {}


@pytest.mark.parametrize("text, words", [
    (json.dumps({"manifest_version": 3, "seq": 1, "shards": [], "ledger_files": []}),
     "m.json is version 3, newer than this spear reads (1 to 2): upgrade spear"),
    (json.dumps({"manifest_version": 2, "shards": []}), "m.json is not a token manifest (KeyError: 'seq')"),
    ("[]", "m.json is not a token manifest"),
    ("{oops", "m.json is not a token manifest (JSONDecodeError"),
])
def test_wrong_manifests_are_one_line_errors(text, words):
    with pytest.raises(FormatError) as err:
        Manifest.from_json(text, where="m.json")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_token_bytes_decode_to_frames_by_codebooks():
    tokens = decode_tokens(bytes(range(6)), 3, 2)
    assert tokens.shape == (3, 2) and tokens[2, 1] == 5
    assert decode_tokens(None, 3, 2) is None
    with pytest.raises(ValueError, match="token bytes \\(5\\) != frames x codebooks \\(3 x 2\\)"):
        decode_tokens(bytes(5), 3, 2)


def test_token_version_changes_with_every_input():
    base = token_version({"sample_rate": 16000}, {"speech": {"teacher": "t", "num_codebooks": 8, "codebook_size": 256}})
    assert base.startswith("tv-") and len(base) == 19
    assert base == token_version({"sample_rate": 16000},
                                 {"speech": {"codebook_size": 256, "num_codebooks": 8, "teacher": "t"}})
    assert base != token_version({"sample_rate": 8000},
                                 {"speech": {"teacher": "t", "num_codebooks": 8, "codebook_size": 256}})
    assert base != token_version({"sample_rate": 16000},
                                 {"speech": {"teacher": "t", "num_codebooks": 16, "codebook_size": 256}})
