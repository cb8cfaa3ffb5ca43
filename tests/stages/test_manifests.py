"""The one reader of labelled manifests (CSV, TSV, JSONL) and how their audio paths resolve."""

from __future__ import annotations

import os

import pytest

from spear.cluster.storage import Storage
from spear.stages.manifests import is_lhotse_manifest, manifest_kind, read_manifest_rows, resolve_manifest_path


def test_rows_with_their_lines(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('\ufeffaudio,text\na.wav,"hello, world"\nb.wav,\n', encoding="utf-8")
    assert read_manifest_rows(str(csv_path), Storage()) == [(2, {"audio": "a.wav", "text": "hello, world"}),
                                                            (3, {"audio": "b.wav", "text": ""})]
    tsv = "audio\tspeaker\nc.flac\ts1\n"
    assert read_manifest_rows("x.TSV", Storage(), text=tsv) == [(2, {"audio": "c.flac", "speaker": "s1"})]
    jsonl = '{"audio": "a.wav"}\n\n[1, 2]\n{"audio": "b.wav", "speaker": 3}\n{broken\n'
    with pytest.raises(ValueError, match=r"^m.jsonl: line 3 is not a JSON object \(a JSON list"):
        read_manifest_rows("m.jsonl", Storage(), text=jsonl)
    bad: list = []
    rows = read_manifest_rows("m.jsonl", Storage(), text=jsonl, bad_line=lambda n, why: bad.append((n, why)))
    assert rows == [(1, {"audio": "a.wav"}), (4, {"audio": "b.wav", "speaker": 3})]
    assert [n for n, _ in bad] == [3, 5]
    with pytest.raises(ValueError, match="must be .csv, .tsv or .jsonl"):
        manifest_kind("m.txt")


def test_lhotse_manifests_are_told_apart():
    assert is_lhotse_manifest("s3://b/cuts.jsonl.gz") and is_lhotse_manifest("cuts.yaml")
    assert is_lhotse_manifest("cuts.json", '[{"id": "c"}]')
    assert is_lhotse_manifest("cuts.jsonl", '{"id": "c", "recording": {}, "supervisions": []}\n{"id": "d"}')
    assert not is_lhotse_manifest("m.jsonl", '{"audio": "a.wav", "type": "speech"}')
    assert not is_lhotse_manifest("m.csv", "audio,type\n")


def test_audio_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_manifest_path("data/m.csv", "a/b.wav") == os.path.join(tmp_path, "data", "a", "b.wav")
    assert resolve_manifest_path("data/m.csv", "../c.wav") == os.path.join(tmp_path, "c.wav")
    assert resolve_manifest_path("data/m.csv", "/abs/d.wav") == "/abs/d.wav"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_manifest_path("data/m.csv", "~/e.wav") == os.path.join(tmp_path, "home", "e.wav")
    assert resolve_manifest_path("s3://bk/dir/m.csv", "sub/f.wav") == "s3://bk/dir/sub/f.wav"
    assert resolve_manifest_path("s3://bk/dir/m.csv", "../g.wav") == "s3://bk/g.wav"
    assert resolve_manifest_path("data/m.csv", "s3://other/h.wav") == "s3://other/h.wav"
