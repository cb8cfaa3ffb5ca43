"""Lhotse manifests and Shar directories as sources: listing and decoding cuts, without Ray.

The corpus is written by Lhotse itself over real audio files (tests/support/lhotse_corpus.py); decoded
cuts are compared with what Lhotse's own ``cut.load_audio()`` gives for the same cut.
"""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pytest

from spear.config import DecodeConfig, SourceConfig, load_config, ConfigError
from spear.schemas.catalog import CATALOG_SCHEMA, cut_uri
from spear.schemas.segments import DECODED_SCHEMA
from spear.stages.audio import flac_decode_pcm16
from spear.stages.catalog import build_catalog
from spear.stages.decode import DecodeStage, plan_decode_blocks
from spear.stages.lhotse_source import source_format

from support.lhotse_corpus import (ADDED, CATALOG_BAD, DECODE_BAD, GOOD_1, SPEAKERS, TEXTS, make_lhotse_corpus,
                                   write_shar)

DECODE = DecodeConfig(max_segment_seconds=4.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = make_lhotse_corpus(tmp_path_factory.mktemp("lhotse"))
    write_shar(c, c.root / "shar")
    return c


def decoded(objects: pa.Table) -> dict[str, dict]:
    """Cut id (or key) -> decoded row, every row through the decode stage (one task per planned block)."""
    out = {}
    for block in plan_decode_blocks(objects, objects_per_task=2, slots=1):
        t = DecodeStage(DECODE)(block)
        assert t.schema.equals(DECODED_SCHEMA)
        for r in t.to_pylist():
            out[r["cut_id"] or r["source_uri"]] = r
    return out


def lhotse_reference(manifest, cut_id) -> np.ndarray:
    """What Lhotse itself loads for the cut, as int16 (16 kHz recordings: no resampling involved)."""
    from lhotse import CutSet

    cut = next(c for c in CutSet.from_file(manifest) if c.id == cut_id)
    x = cut.load_audio()
    x = x.mean(axis=0) if x.ndim == 2 else x
    return np.clip(np.rint(x.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def test_formats_are_told_from_the_path_or_given(corpus):
    from spear.cluster.storage import Storage

    st = Storage()
    for uri, want in ((corpus.manifest1, "lhotse-cuts"), (corpus.root / "x.json", "lhotse-cuts"),
                      (corpus.root / "shar", "lhotse-shar"), (corpus.audio, "files")):
        assert source_format(SourceConfig(uri=str(uri), domain="speech"), st) == want
    assert source_format(SourceConfig(uri=str(corpus.audio), domain="speech", format="lhotse-shar"), st) == "lhotse-shar"
    with pytest.raises(ConfigError, match=r"corpus.sources.0.*format: lhotse-cuts needs uri to name a manifest"):
        load_config(None, ['corpus.sources=[{"uri": "data/speech", "domain": "speech", "format": "lhotse-cuts"}]'])


def test_a_manifest_lists_one_row_per_cut_with_its_metadata_and_sets_bad_cuts_aside(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")])
    assert cat.objects.schema.equals(CATALOG_SCHEMA)
    rows = {r["cut_id"]: r for r in cat.objects.to_pylist()}
    assert set(rows) == set(GOOD_1) | set(DECODE_BAD)     # duplicate and MixedCut set aside at listing
    a0 = rows["a-0"]
    assert a0["uri"] == cut_uri("a-0") == "lhotse-cut:a-0" and a0["source"] == "m" and a0["domain"] == "speech"
    assert a0["audio_uri"] == str(corpus.audio / "long_a.flac") and a0["cut_start"] == 0.0 and a0["cut_duration"] == 3.0
    assert (a0["speaker"], a0["language"], a0["text"]) == ("spk1", "en", "hello world")
    assert rows["a-1"]["text"] == "second part" and rows["a-1"]["speaker"] is None   # texts joined
    assert rows["b-0"]["speaker"] is rows["b-0"]["text"] is None
    assert rows["st-1"]["cut_channels"] == [1] and rows["st-mix"]["cut_channels"] is None  # both channels: all
    assert rows["a-0"]["cut_channels"] is None                                              # mono: its one channel
    assert len({r["etag"] for r in rows.values()}) == len(rows)
    reasons = [q["reason"] for q in cat.unreadable]
    assert len(reasons) == len(CATALOG_BAD)
    for words in CATALOG_BAD:
        assert any(words in r for r in reasons), (words, reasons)
    # the same manifest again: the same keys and etags (what the ledger compares)
    again = build_catalog([SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")]).objects
    assert again.select(["uri", "etag", "size"]).equals(cat.objects.select(["uri", "etag", "size"]))


def test_listing_in_small_batches_gives_the_same_catalog_and_a_damaged_manifest_lists_nothing(corpus, tmp_path,
                                                                                            monkeypatch):
    import gzip

    import spear.stages.lhotse_source as lhotse_source

    whole = build_catalog([SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")])
    monkeypatch.setattr(lhotse_source, "LIST_CHUNK_ROWS", 2)    # a batch per two cuts: duplicates across batches
    small = build_catalog([SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")])
    assert small.objects.column("uri").num_chunks > 1 and small.objects.equals(whole.objects)
    assert sorted(q["reason"] for q in small.unreadable) == sorted(q["reason"] for q in whole.unreadable)
    # good lines, then a damaged one: read lazily, the manifest still lists none of its cuts
    lines = gzip.open(corpus.manifest1, "rt").read().splitlines()
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("\n".join(lines[:3] + ['{"id": "broken", "start": ']) + "\n")
    cat = build_catalog([SourceConfig(uri=str(damaged), domain="speech", name="d")])
    assert cat.num_objects == 0 and len(cat.unreadable) == 1
    assert "not a Lhotse CutSet manifest" in cat.unreadable[0]["reason"] and cat.unreadable[0]["uri"] == str(damaged)


def test_a_cut_changes_its_etag_when_its_range_channel_or_audio_changes(corpus, tmp_path):
    from lhotse import CutSet

    base = {r["cut_id"]: r["etag"] for r in build_catalog(
        [SourceConfig(uri=str(corpus.manifest1), domain="speech")]).objects.to_pylist()}
    cuts = {}
    for c in CutSet.from_file(corpus.manifest1):
        cuts.setdefault(c.id, c)
    st1 = cuts["st-1"]
    st1.channel = 0
    a1 = cuts["a-1"]
    a1.recording.sources[0].source = str(tmp_path / "moved" / "long_a.flac")
    changed = [cuts["a-0"].truncate(duration=2.5, preserve_id=True), a1, st1, cuts["b-0"]]
    m = tmp_path / "changed.jsonl"
    CutSet.from_cuts(changed).to_file(m)
    now = {r["cut_id"]: r["etag"] for r in build_catalog([SourceConfig(uri=str(m), domain="speech")]).objects.to_pylist()}
    assert now["b-0"] == base["b-0"]                       # unchanged cut, another manifest: same key and etag
    assert [c for c in ("a-0", "a-1", "st-1") if now[c] == base[c]] == []


def test_cuts_decode_to_exactly_their_range_and_channel(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")])
    rows = decoded(cat.objects)
    for cid in ("a-0", "a-1", "st-1", "st-mix"):
        r = rows[cid]
        assert r["quarantine_reason"] is None and r["object_segments"] == 1 and r["sample_rate"] == 16000
        got, want = flac_decode_pcm16(r["audio"]), lhotse_reference(corpus.manifest1, cid)
        assert got.size == want.size == int(GOOD_1[cid][2] * 16000)
        assert np.abs(got.astype(np.int32) - want).max() <= 1, cid   # Lhotse's own samples (mix: rounding)
        assert r["offset"] == int(GOOD_1[cid][1] * 16000) and r["duration"] == GOOD_1[cid][2]
    # 22.05 kHz: resampled to 16 kHz, the cut's length
    b0 = rows["b-0"]
    assert b0["source_sample_rate"] == 22050 and b0["num_samples"] == int(3.5 * 16000)
    assert (rows["st-1"]["speaker"], rows["a-0"]["text"]) == (SPEAKERS["st-1"], TEXTS["a-0"])
    assert rows["st-1"]["source_channels"] == 2
    # the stereo cut of channel 1 is that channel, not the mix
    assert not np.array_equal(flac_decode_pcm16(rows["st-1"]["audio"])[:16000],
                              flac_decode_pcm16(rows["st-mix"]["audio"])[8000:24000])
    for cid, words in DECODE_BAD.items():
        assert rows[cid]["audio"] is None and words in rows[cid]["quarantine_reason"], rows[cid]["quarantine_reason"]
    assert rows["gone"]["quarantine_stage"] == "read" and rows["past"]["quarantine_stage"] == "decode"
    assert "cut_into_windows" in rows["long"]["quarantine_reason"]


def test_the_cuts_of_one_recording_share_a_decode_task(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus.manifest2), domain="speech")])
    blocks = plan_decode_blocks(cat.objects, objects_per_task=1, slots=1)   # at least 4 tasks: 3 cuts each at most
    assert sum(b.num_rows for b in blocks) == cat.num_objects and max(b.num_rows for b in blocks) == 3
    homes, counts = {}, {}
    for i, b in enumerate(blocks):
        for a in b["audio_uri"].to_pylist():
            homes.setdefault(a, set()).add(i)
            counts[a] = counts.get(a, 0) + 1
    assert counts[str(corpus.audio / "long_a.flac")] == 5
    assert all(len(homes[a]) == -(-counts[a] // 3) for a in homes), homes   # as few tasks as 3 per task allow


def test_a_shar_directory_written_by_lhotse_decodes_to_the_same_audio_as_its_manifest(corpus):
    shar = build_catalog([SourceConfig(uri=str(corpus.root / "shar"), domain="speech", name="s")])
    assert shar.unreadable == [] and set(shar.objects["cut_id"].to_pylist()) == set(GOOD_1)
    assert all(u.endswith(".tar") for u in shar.objects["audio_uri"].to_pylist())
    from_shar = decoded(shar.objects)
    from_manifest = decoded(build_catalog([SourceConfig(uri=str(corpus.manifest1), domain="speech")]).objects)
    for cid in GOOD_1:
        a, b = flac_decode_pcm16(from_shar[cid]["audio"]), flac_decode_pcm16(from_manifest[cid]["audio"])
        assert from_shar[cid]["quarantine_reason"] is None and a.size == b.size
        assert np.abs(a.astype(np.int32) - b).max() <= 1, cid
        assert from_shar[cid]["text"] == from_manifest[cid]["text"]


def test_unreadable_manifests_and_shar_without_audio_are_reported_not_fatal(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    noaudio = tmp_path / "noaudio"
    noaudio.mkdir()
    shutil.copy(corpus.root / "shar" / "cuts.000000.jsonl.gz", noaudio)
    cat = build_catalog([SourceConfig(uri=str(bad), domain="speech"), SourceConfig(uri=str(noaudio), domain="speech"),
                         SourceConfig(uri=str(tmp_path / "absent.jsonl.gz"), domain="speech"),
                         SourceConfig(uri=str(corpus.manifest1), domain="speech", name="ok")])
    reasons = " | ".join(q["reason"] for q in cat.unreadable)
    assert "not a Lhotse CutSet manifest" in reasons and "no Lhotse Shar recording shards" in reasons
    assert "absent.jsonl.gz" in reasons
    assert cat.num_objects == len(GOOD_1) + len(DECODE_BAD)


def test_manifest_and_shar_on_s3_list_and_decode_like_local(corpus, s3_server, s3_storage):
    """An S3 manifest whose recordings are named relative to it, and a Shar directory uploaded as is."""
    from lhotse import CutSet

    root = f"s3://{s3_server.bucket}/lh-{uuid.uuid4().hex[:8]}"
    for name in ("long_a.flac", "long_b.wav", "stereo.flac"):
        s3_storage.write_bytes(f"{root}/audio/{name}", (corpus.audio / name).read_bytes())
    local = corpus.root / "relative.jsonl.gz"
    CutSet.from_cuts([_relative_audio(c) for c in CutSet.from_file(corpus.manifest2)
                      if c.id in GOOD_1 or c.id in ADDED]).to_file(local)
    s3_storage.write_bytes(f"{root}/cuts.jsonl.gz", local.read_bytes())
    for f in os.listdir(corpus.root / "shar"):
        s3_storage.write_bytes(f"{root}/shar/{f}", (corpus.root / "shar" / f).read_bytes())
    cat = build_catalog([SourceConfig(uri=f"{root}/cuts.jsonl.gz", domain="speech", name="m"),
                         SourceConfig(uri=f"{root}/shar", domain="audio", name="s")], s3_storage)
    # the Shar cuts repeat the manifest's ids (and the manifest repeats a-0): duplicates, set aside
    assert sorted(q["uri"] for q in cat.unreadable) == sorted(cut_uri(c) for c in ["a-0", *GOOD_1])
    assert all("duplicate cut id" in q["reason"] for q in cat.unreadable)
    by_source = {s: [r for r in cat.objects.to_pylist() if r["source"] == s] for s in ("m", "s")}
    assert {r["cut_id"] for r in by_source["m"]} == set(GOOD_1) | set(ADDED) and by_source["s"] == []
    assert by_source["m"][0]["audio_uri"].startswith(f"{root}/audio/")
    stage = DecodeStage(DECODE, s3_server.storage_options())
    rows = {r["cut_id"]: r for r in stage(cat.objects).to_pylist()}
    assert all(r["quarantine_reason"] is None for r in rows.values())
    assert flac_decode_pcm16(rows["a-0"]["audio"]).size == 3 * 16000
    shar = build_catalog([SourceConfig(uri=f"{root}/shar", domain="audio", name="s")], s3_storage)
    shar_rows = {r["cut_id"]: r for r in stage(shar.objects).to_pylist()}
    for cid in GOOD_1:
        assert np.abs(flac_decode_pcm16(shar_rows[cid]["audio"]).astype(np.int32)
                      - flac_decode_pcm16(rows[cid]["audio"])).max() <= 1


def _relative_audio(cut):
    """The cut with its recording's audio named relative to the manifest (``audio/<file>``)."""
    src = cut.recording.sources[0]
    src.source = "audio/" + os.path.basename(src.source)
    return cut


def test_resampled_recordings_decode_and_other_transforms_are_set_aside(corpus, tmp_path):
    from lhotse import CutSet

    a0 = next(c for c in CutSet.from_file(corpus.manifest1) if c.id == "a-0")
    resampled = a0.resample(8000).with_id("a-0-8k")           # a Resample transform: decoding resamples anyway
    faster = a0.perturb_speed(1.1).with_id("a-0-fast")        # changes the audio: not tokenised
    m = tmp_path / "transforms.jsonl.gz"
    CutSet.from_cuts([resampled, faster]).to_file(m)
    cat = build_catalog([SourceConfig(uri=str(m), domain="speech")])
    assert cat.objects["cut_id"].to_pylist() == ["a-0-8k"]
    assert len(cat.unreadable) == 1 and "audio transforms ['Speed']" in cat.unreadable[0]["reason"]
    row = DecodeStage(DECODE)(cat.objects).to_pylist()[0]
    assert row["quarantine_reason"] is None
    assert np.array_equal(flac_decode_pcm16(row["audio"]), lhotse_reference(corpus.manifest1, "a-0"))


def test_file_sources_and_cut_sources_decode_side_by_side(corpus):
    cat = build_catalog([SourceConfig(uri=str(corpus.audio), domain="audio", name="files"),
                         SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")])
    assert cat.unreadable != [] and sorted(set(cat.objects["source"].to_pylist())) == ["files", "m"]
    rows = [r for b in plan_decode_blocks(cat.objects, objects_per_task=2, slots=1) for r in DecodeStage(DECODE)(b).to_pylist()]
    files = [r for r in rows if r["source"] == "files"]
    # the 9 s file is cut into 4 s segments as before, with no cut metadata; the cuts are whole
    a = sorted((r["offset"], r["num_samples"]) for r in files if r["relative_path"] == "long_a.flac")
    assert a == [(0, 64000), (64000, 64000), (128000, 16000)]
    assert all(r["cut_id"] is None and r["text"] is None for r in files)
    cuts = {r["cut_id"]: r for r in rows if r["source"] == "m" and r["quarantine_reason"] is None}
    assert set(cuts) == set(GOOD_1)
