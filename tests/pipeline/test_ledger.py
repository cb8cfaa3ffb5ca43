"""The ledger of a token version (TokenStore) on real files in tmp_path, without Ray: commits, what reads back,
which rows are live, and the files no commit names."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from spear.cluster.storage import Storage, StorageError
from spear.pipeline.ledger import TokenStore, list_token_versions
from spear.schemas.ledger import LEDGER_SCHEMA, Manifest, quarantined_entry, tokenized_entry
from spear.schemas.shards import token_shard_schema
from spear.schemas.versioning import FormatError
from spear.stages.audio import flac_encode
from spear.stages.writer import parquet_bytes

ROLES = ["speech"]
AUDIO = flac_encode(np.zeros(160, np.int16))


def _obj(name: str, etag: str = "e1", segments: int = 1) -> dict:
    return {"uri": f"/corpus/{name}", "source": "c", "domain": "speech", "etag": etag, "size": 10,
            "segments": segments, "audio_seconds": 1.5 * segments}


def _write_shard(store: TokenStore, run_id: str, n: int, rows: list[tuple[str, int]]) -> dict:
    """A real token shard of ``rows`` (object name, segment index) written by ``run_id``; its manifest entry."""
    schema = token_shard_schema(ROLES)
    cols: dict[str, list] = {f.name: [] for f in schema}
    for name, i in rows:
        tokens = np.full((3, 2), i, np.uint8)
        values = {"segment_id": f"{name}-{i}", "source": "c", "source_uri": f"/corpus/{name}", "relative_path": name,
                  "source_etag": "e", "source_size": 10, "content_sha256": "x", "domain": "speech", "offset": i,
                  "num_samples": 160, "duration": 0.01, "sample_rate": 16000, "audio": AUDIO, "run_id": run_id,
                  "speech_tokens": tokens.tobytes(), "speech_num_frames": 3, "speech_num_codebooks": 2,
                  "speech_frame_rate": 50.0, "speech_codebook": "cb",
                  "cut_id": None, "speaker": None, "language": None, "text": None}  # a file source: no cut metadata
        for k in cols:
            cols[k].append(values[k])
    data = parquet_bytes(pa.table(cols, schema=schema))
    uri = f"{store.shard_dir(run_id)}/shard-{n}.parquet"
    store.storage.write_bytes(uri, data)
    return {"file": uri, "rows": len(rows), "bytes": len(data)}


@pytest.fixture
def store(tmp_path) -> TokenStore:
    st = TokenStore(str(tmp_path / "out"), "tv-test", Storage())
    st.write_version_info({"token_version": "tv-test", "teachers": {"speech": {"num_codebooks": 2}}})
    return st


def test_an_empty_store_has_no_manifest_and_an_empty_ledger(store):
    assert store.latest_manifest() is None and store.shard_files() == []
    assert store.ledger().num_rows == 0 and store.ledger().schema.equals(LEDGER_SCHEMA)
    with pytest.raises(StorageError, match="no committed data"):
        store.read_table()


def test_a_commit_reads_back_with_names_relative_to_the_version_root(store, tmp_path):
    shard = _write_shard(store, "r1", 0, [("a.wav", 0), ("a.wav", 1), ("b.wav", 0)])
    m = store.commit("r1", [dict(shard, run_id="r1")], [tokenized_entry(_obj("a.wav", segments=2), "r1"),
                                                        tokenized_entry(_obj("b.wav"), "r1")], info={"final": True})
    assert (m.seq, m.run_id, m.info) == (1, "r1", {"final": True})
    raw = json.loads((tmp_path / "out/tokens/tv-test/manifests/00000001.json").read_text())
    assert raw["manifest_version"] == 2
    assert raw["shards"][0]["file"] == "shards/r1/shard-0.parquet" and raw["ledger_files"] == ["ledger/00000001-r1.parquet"]
    # another spelling of the same root reads the same commit
    again = TokenStore(f"file://{tmp_path}/out/", "tv-test", Storage())
    assert again.latest_manifest().shards == m.shards and again.shard_files() == [shard["file"]]
    ledger = again.ledger().to_pylist()
    assert [(r["source_uri"], r["status"], r["segments"]) for r in ledger] == [
        ("/corpus/a.wav", "tokenized", 2), ("/corpus/b.wav", "tokenized", 1)]
    table = again.read_table(["segment_id", "speech_tokens"])
    assert table["segment_id"].to_pylist() == ["a.wav-0", "a.wav-1", "b.wav-0"]
    segs = list(again.iter_segments(roles=ROLES))
    assert segs[1]["speech_tokens"].shape == (3, 2) and int(segs[1]["speech_tokens"][0, 0]) == 1
    assert list_token_versions(str(tmp_path / "out"), Storage()) == ["tv-test"]


def test_only_rows_of_the_run_the_latest_entry_names_are_live(store):
    first = _write_shard(store, "r1", 0, [("a.wav", 0), ("b.wav", 0)])
    store.commit("r1", [dict(first, run_id="r1")], [tokenized_entry(_obj("a.wav"), "r1"),
                                                    tokenized_entry(_obj("b.wav"), "r1")])
    # a.wav changed and was tokenised again by r2; b.wav became undecodable; a killed run's shard is never committed
    second = _write_shard(store, "r2", 0, [("a.wav", 7)])
    _write_shard(store, "r3-killed", 0, [("c.wav", 0)])
    m = store.commit("r2", [dict(second, run_id="r2")], [
        tokenized_entry(_obj("a.wav", etag="e2"), "r2"),
        quarantined_entry({"uri": "/corpus/b.wav", "source": "c", "domain": "speech", "etag": "e3", "size": 10,
                           "stage": "decode", "reason": "corrupt audio"}, "r2")])
    assert m.seq == 2 and len(m.shards) == 2 and len(m.ledger_files) == 2   # everything live is named again
    ledger = {r["source_uri"]: r for r in store.ledger().to_pylist()}
    assert (ledger["/corpus/a.wav"]["run_id"], ledger["/corpus/a.wav"]["etag"]) == ("r2", "e2")
    assert (ledger["/corpus/b.wav"]["status"], ledger["/corpus/b.wav"]["reason"]) == ("quarantined",
                                                                                       "decode: corrupt audio")
    assert store.read_table(["segment_id"])["segment_id"].to_pylist() == ["a.wav-7"]
    assert [u.rsplit("/", 2)[1] for u in store.uncommitted_files()] == ["r3-killed"]


def test_clean_removes_only_what_no_commit_names(store):
    shard = _write_shard(store, "r1", 0, [("a.wav", 0)])
    store.commit("r1", [dict(shard, run_id="r1")], [tokenized_entry(_obj("a.wav"), "r1")])
    leftover = _write_shard(store, "r2", 0, [("b.wav", 0)])
    removed, kept = store.clean_uncommitted(min_age_s=3600)
    assert removed == [] and kept == [leftover["file"]]
    removed, kept = store.clean_uncommitted()
    assert removed == [leftover["file"]] and kept == [] and store.uncommitted_files() == []
    assert store.read_table(["segment_id"]).num_rows == 1


def test_a_commit_refuses_a_shard_outside_the_version(store, tmp_path):
    with pytest.raises(StorageError, match="not inside token version"):
        store.commit("r1", [{"file": str(tmp_path / "elsewhere.parquet"), "rows": 1, "bytes": 1, "run_id": "r1"}], [])


def test_version_info_records_codebooks_relative_to_the_output(store, tmp_path):
    uri = str(tmp_path / "out" / "codebooks" / "speech-x")
    store.write_version_info({"token_version": "tv-test", "teachers": {"speech": {"uri": uri}}}, replace=True)
    raw = json.loads((tmp_path / "out/tokens/tv-test/version.json").read_text())
    assert raw["teachers"]["speech"]["uri"] == "codebooks/speech-x"
    assert store.version_info()["teachers"]["speech"]["uri"] == uri
    store.write_version_info({"token_version": "other"})            # kept unless replace
    assert store.version_info()["token_version"] == "tv-test"


def test_a_manifest_from_a_newer_spear_is_a_one_line_error(store, tmp_path):
    shard = _write_shard(store, "r1", 0, [("a.wav", 0)])
    store.commit("r1", [dict(shard, run_id="r1")], [tokenized_entry(_obj("a.wav"), "r1")])
    path = tmp_path / "out/tokens/tv-test/manifests/00000002.json"
    path.write_text(Manifest(seq=2, shards=[], ledger_files=[]).to_json().replace('"manifest_version": 2',
                                                                                   '"manifest_version": 9'))
    with pytest.raises(FormatError) as err:
        TokenStore(str(tmp_path / "out"), "tv-test", Storage()).latest_manifest()
    assert "\n" not in str(err.value) and "version 9" in str(err.value) and str(path) in str(err.value)
