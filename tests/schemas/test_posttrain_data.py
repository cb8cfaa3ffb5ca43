"""The post-training data formats: prepared tables, quarantine rows, the reuse record, the text-target record."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from spear.schemas.posttrain_data import (POSTTRAIN_UTTERANCE_SCHEMA, check_utterance_table, count_by,
                                          parse_prepared_record, parse_quarantine_jsonl, parse_targets_record,
                                          prepared_record, quarantine_jsonl, quarantine_row, targets_record,
                                          text_key, utterance_table)
from spear.schemas.versioning import FormatError

ROW = {"utt_id": "u1", "split": "train", "audio": b"fLaC", "num_samples": 16000, "speaker": "s1", "source": "/m.csv",
       "row": 2, "extra": "ignored"}


def test_utterance_table_round_trip_and_checks():
    t = utterance_table([ROW, {**ROW, "utt_id": "u2", "split": "eval", "pivot": "hello"}])
    assert t.schema.equals(POSTTRAIN_UTTERANCE_SCHEMA, check_metadata=True)
    assert t["pivot"].to_pylist() == [None, "hello"] and "extra" not in t.column_names
    with pytest.raises(ValueError, match="'u3': split must be one of"):
        utterance_table([{**ROW, "utt_id": "u3", "split": "test"}])
    # read back: columns in another order are put in the schema's
    shuffled = t.select(list(reversed(t.column_names)))
    assert check_utterance_table(shuffled, "x").column_names == POSTTRAIN_UTTERANCE_SCHEMA.names
    with pytest.raises(FormatError, match="x.parquet is not a prepared post-training table"):
        check_utterance_table(pa.table({"utt_id": ["a"]}), "x.parquet")
    newer = t.replace_schema_metadata({**t.schema.metadata, b"spear.version": b"7"})
    with pytest.raises(FormatError, match="version 7, newer"):
        check_utterance_table(newer, "x.parquet")
    with pytest.raises(FormatError, match="lacks the column"):
        check_utterance_table(t.drop_columns(["row"]), "x.parquet")


def test_quarantine_rows_are_one_line_and_read_back():
    q = quarantine_row("/m.csv", 4, "u4", "/a.wav", "decode", "corrupt audio", "bad\nframe  data")
    assert q["reason"] == "bad frame data"
    with pytest.raises(ValueError, match="stage must be one of"):
        quarantine_row("/m.csv", 4, "u4", "/a.wav", "train", "x", "y")
    text = quarantine_jsonl([q, quarantine_row("/m.csv", None, None, None, "manifest", "bad manifest row", "z")])
    assert len(text.splitlines()) == 2 and parse_quarantine_jsonl(text, "q.jsonl")[0] == q
    with pytest.raises(FormatError, match="q.jsonl line 1 is not valid JSON"):
        parse_quarantine_jsonl("{oops\n", "q.jsonl")
    with pytest.raises(FormatError, match="q.jsonl line 1 is not a post-training quarantine row"):
        parse_quarantine_jsonl('{"uri": "a"}\n', "q.jsonl")
    assert count_by(["b", "a", "b", "c"]) == {"b": 2, "a": 1, "c": 1}


def test_prepared_and_targets_records():
    rec = prepared_record([{"uri": "/m.csv", "split": "train", "size": 3, "etag": "e"}], {"sample_rate": 16000},
                          {"rows": {"train": 1}})
    assert parse_prepared_record(json.dumps(rec), "p.json") == rec
    with pytest.raises(FormatError, match="p.json is not a posttrain-prepared record"):
        parse_prepared_record(json.dumps({**rec, "kind": "other"}), "p.json")
    with pytest.raises(FormatError, match="newer than this spear reads"):
        parse_prepared_record(json.dumps({**rec, "version": 99}), "p.json")
    with pytest.raises(FormatError, match="lacks 'summary'"):
        parse_prepared_record(json.dumps({k: v for k, v in rec.items() if k != "summary"}), "p.json")
    t = targets_record("pivot-hash:64", 64, ["a", "b"])
    assert parse_targets_record(json.dumps(t), "t.json")["keys"] == [text_key("a"), text_key("b")]
    assert text_key("a") != text_key("a ") and len(text_key("a")) == 32
    with pytest.raises(FormatError, match="not a posttrain-text-targets record"):
        parse_targets_record(json.dumps(rec), "t.json")
