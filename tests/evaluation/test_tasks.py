"""Probe tasks: the hash split, the frame grid and user manifests (with their errors)."""

from __future__ import annotations

import json

import pytest

from spear.cluster.storage import Storage
from spear.evaluation.tasks import ItemTable, frame_grid, hash_split, load_manifest_task


def test_hash_split_is_stable_and_near_20_percent():
    keys = [f"clips/{i:05d}.wav" for i in range(2000)]
    splits = [hash_split(k) for k in keys]
    assert splits == [hash_split(k) for k in keys]
    assert 0.17 < splits.count("test") / len(keys) < 0.23
    assert frame_grid(1.0).tolist() == [0.125, 0.375, 0.625, 0.875]


def test_manifest_errors_are_clear(tmp_path):
    bad_split = tmp_path / "a.csv"
    bad_split.write_text("uri,label,split\nx.wav,yes,holdout\n")
    with pytest.raises(ValueError, match="split 'holdout'"):
        load_manifest_task(str(bad_split), ItemTable(), Storage())
    no_label = tmp_path / "b.jsonl"
    no_label.write_text(json.dumps({"uri": "x.wav"}) + "\n")
    with pytest.raises(ValueError, match="needs `uri` and `label`"):
        load_manifest_task(str(no_label), ItemTable(), Storage())
    with pytest.raises(ValueError, match=".csv, .tsv or .jsonl"):
        (tmp_path / "c.txt").write_text("x")
        load_manifest_task(str(tmp_path / "c.txt"), ItemTable(), Storage())
    ok = tmp_path / "sub" / "d.csv"
    ok.parent.mkdir()
    ok.write_text("path,label,split\nclips/x.wav,a,dev\n/abs/y.wav,b,test\n")
    items = ItemTable()
    task = load_manifest_task(str(ok), items, Storage())
    assert task.name == "d" and task.splits == ["train", "test"] and task.labels == ["a", "b"]
    assert items.uris == [str(tmp_path / "sub" / "clips" / "x.wav"), "/abs/y.wav"]
    assert len(task.items) == 2
