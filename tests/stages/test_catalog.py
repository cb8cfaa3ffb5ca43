"""The catalog stage over a real folder of small audio files: what is listed, how it is named, and what is not."""

from __future__ import annotations

import os

import pytest

from spear.config import SourceConfig
from spear.schemas.catalog import CATALOG_SCHEMA
from spear.stages.catalog import build_catalog

from support.audio_files import encode, make_signal

FILES = {  # relative path -> codec
    "a/one.wav": "wav",
    "a/deep/two.flac": "flac",
    "b/three.ogg": "vorbis",
    "b/FOUR.MP3": "mp3",          # extensions match whatever their case
}
NOT_LISTED = ["a/readme.txt", "a/.hidden.wav", "b/notes.md"]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for rel, codec in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(make_signal(16000, 1, 0.3), 16000, codec))
    for rel in NOT_LISTED:
        (root / rel).write_bytes(b"not audio")
    return root


def test_lists_every_audio_file_with_its_size_etag_and_path(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus), domain="speech", name="c")])
    assert cat.objects.schema.equals(CATALOG_SCHEMA) and cat.unreadable == []
    rows = cat.objects.to_pylist()
    assert sorted(r["relative_path"] for r in rows) == sorted(FILES)
    for r in rows:
        st = os.stat(corpus / r["relative_path"])
        assert r["uri"] == str(corpus / r["relative_path"])
        assert (r["source"], r["domain"], r["size"]) == ("c", "speech", st.st_size)
        assert r["etag"] == f"{st.st_size}-{st.st_mtime_ns}" and r["mtime"] == st.st_mtime
    assert cat.num_objects == len(FILES)
    assert cat.total_bytes == sum(os.path.getsize(corpus / rel) for rel in FILES)


def test_extensions_choose_the_files(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus), domain="audio", extensions=[".FLAC", "mp3"])])
    assert sorted(cat.objects["relative_path"].to_pylist()) == ["a/deep/two.flac", "b/FOUR.MP3"]
    assert set(cat.objects["source"].to_pylist()) == {"corpus"}  # default name: the last path component


def test_relative_absolute_home_and_file_uri_spellings_list_the_same_objects(corpus, tmp_path, monkeypatch):
    want = build_catalog([SourceConfig(uri=str(corpus), domain="speech", name="c")]).objects
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for spelling in ("corpus", "./corpus/", "~/corpus", f"file://{corpus}"):
        got = build_catalog([SourceConfig(uri=spelling, domain="speech", name="c")]).objects
        assert got.drop_columns(["mtime"]).equals(want.drop_columns(["mtime"])), spelling


def test_a_single_file_source_lists_itself(corpus):
    path = corpus / "a" / "one.wav"
    (row,) = build_catalog([SourceConfig(uri=str(path), domain="speech", name="one")]).objects.to_pylist()
    assert (row["uri"], row["relative_path"], row["size"]) == (str(path), "one.wav", path.stat().st_size)


def test_a_missing_prefix_is_a_quarantine_record_and_the_other_sources_go_on(corpus, tmp_path):
    missing = tmp_path / "nowhere"
    cat = build_catalog([SourceConfig(uri=str(missing), domain="audio", name="gone"),
                         SourceConfig(uri=str(corpus / "b"), domain="speech", name="b")])
    assert sorted(cat.objects["relative_path"].to_pylist()) == ["FOUR.MP3", "three.ogg"]
    assert cat.unreadable == [{"uri": str(missing), "source": "gone", "domain": "audio", "etag": "",
                               "stage": "catalog", "reason": "prefix does not exist"}]


def test_overlapping_sources_list_an_object_once_under_the_first(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus / "a"), domain="speech", name="first"),
                         SourceConfig(uri=str(corpus), domain="audio", name="second")])
    by_uri = {r["uri"]: r for r in cat.objects.to_pylist()}
    assert len(by_uri) == cat.num_objects == len(FILES)
    assert by_uri[str(corpus / "a" / "one.wav")]["source"] == "first"
    assert by_uri[str(corpus / "a" / "one.wav")]["relative_path"] == "one.wav"
    assert by_uri[str(corpus / "b" / "three.ogg")]["source"] == "second"


def test_an_empty_folder_lists_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    cat = build_catalog([SourceConfig(uri=str(tmp_path / "empty"), domain="speech")])
    assert cat.num_objects == 0 and cat.total_bytes == 0 and cat.unreadable == []
    assert cat.objects.schema.equals(CATALOG_SCHEMA)
