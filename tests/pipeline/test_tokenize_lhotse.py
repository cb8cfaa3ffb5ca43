"""`spear tokenize` over Lhotse corpora: a CutSet manifest on local disk, a Shar directory on SeaweedFS.

The corpus is written by Lhotse itself over real audio files (tests/support/lhotse_corpus.py); the teachers
are the weight-free ones with tiny codebooks, on the session's embedded Ray. One token row per cut, its
metadata in the shards, bad cuts quarantined with reasons, and per-cut incremental runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from spear.cluster.storage import Storage
from spear.config import SourceConfig, load_config
from spear.pipeline.ledger import TokenStore
from spear.pipeline.tokenize_job import run_tokenize

from support.configs import storage_sets
from support.lhotse_corpus import (ADDED, CATALOG_BAD, DECODE_BAD, GOOD_1, SPEAKERS, TEXTS, make_lhotse_corpus,
                                   write_shar)

SETS = ["mvq.speech_codebooks=4", "mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.sample_frames=1000",
        "decode.max_segment_seconds=4", "tokenize.commit_interval_s=30"]
META = ["segment_id", "source_uri", "cut_id", "speaker", "language", "text", "duration", "offset", "speech_tokens",
        "speech_num_frames", "speech_frame_rate"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = make_lhotse_corpus(tmp_path_factory.mktemp("lhotse-tok"))
    write_shar(c, c.root / "shar")
    return c


def cfg_for(out, sources, st=None):
    cfg = load_config(None, [f"output={out}"] + SETS + (storage_sets(st) if st else []))
    cfg.corpus.sources = [SourceConfig(uri=str(uri), domain=domain, name=name) for name, domain, uri in sources]
    return cfg


def check_rows(table, ids, shar=False):
    """One live row per cut, with its duration, metadata and speech tokens (Shar holds each cut's own audio:
    it starts at 0)."""
    rows = {r["cut_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(ids) and table.num_rows == len(ids)
    spec = {**GOOD_1, **ADDED}
    for cid, r in rows.items():
        assert r["source_uri"] == f"lhotse-cut:{cid}" and r["duration"] == spec[cid][2]
        assert r["offset"] == (0 if shar else int(spec[cid][1] * 16000))
        assert r["speech_tokens"] is not None
        assert abs(r["speech_num_frames"] - r["duration"] * r["speech_frame_rate"]) <= 2
        assert r["speaker"] == SPEAKERS.get(cid) and r["text"] == TEXTS.get(cid)
        assert r["language"] == ("en" if cid in TEXTS or cid in SPEAKERS else None)


@pytest.mark.slow
def test_a_local_manifest_then_a_larger_one_tokenise_each_cut_once(ray_cluster, corpus, tmp_path):
    out = str(tmp_path / "T")
    first = run_tokenize(cfg_for(out, [("m", "speech", corpus.manifest1)]), progress=False)
    assert first.new_objects == len(GOOD_1) and first.pending_objects == len(GOOD_1) + len(DECODE_BAD)
    reasons = {q["uri"]: q["reason"] for q in first.quarantined}
    for cid, words in DECODE_BAD.items():
        assert words in reasons[f"lhotse-cut:{cid}"], reasons
    for words in CATALOG_BAD:
        assert any(words in r for r in reasons.values()), (words, reasons)
    store = TokenStore(out, first.token_version, Storage())
    check_rows(store.read_table(META), GOOD_1)
    ledger = {r["source_uri"]: r for r in store.ledger().to_pylist()}
    assert {u for u, r in ledger.items() if r["status"] == "quarantined"} == {f"lhotse-cut:{c}" for c in DECODE_BAD}

    # a new manifest (another source name) holding the old cuts and two more: only the two are processed
    second = run_tokenize(cfg_for(out, [("m2", "speech", corpus.manifest2)]), progress=False)
    assert second.token_version == first.token_version
    assert (second.pending_objects, second.new_objects) == (len(ADDED), len(ADDED))
    assert second.skipped_objects == len(GOOD_1) + len(DECODE_BAD)
    check_rows(store.read_table(META), {**GOOD_1, **ADDED})

    # the first manifest again (the added cuts are not in it): nothing to do, their tokens stay; a real
    # `spear tokenize --input <manifest>` process decides it from the ledger without starting Ray
    spear = os.path.join(os.path.dirname(sys.executable), "spear")
    proc = subprocess.run([spear, "tokenize", "--input", str(corpus.manifest1), "--domain", "speech", "--output", out,
                           "--json"] + [a for s in SETS for a in ("--set", s)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    noop = json.loads(proc.stdout)
    assert noop["ray_started"] is False and noop["pending_objects"] == 0 and noop["new_objects"] == 0
    assert noop["committed_objects"] == len(GOOD_1) + len(ADDED)
    check_rows(store.read_table(META), {**GOOD_1, **ADDED})

    # a dataset written before the cut columns existed (the same shards without them) reads with nulls
    old = tmp_path / "old"
    shutil.copytree(out, old)
    old_store = TokenStore(str(old), first.token_version, Storage())
    for f in old_store.shard_files():
        t = pq.read_table(f)
        pq.write_table(t.drop_columns(["cut_id", "speaker", "language", "text"]), f)
    t = old_store.read_table(["segment_id", "cut_id", "text", "speech_tokens"])
    assert t.num_rows == len(GOOD_1) + len(ADDED) and t["cut_id"].null_count == t["text"].null_count == t.num_rows
    assert "cut_id" in old_store.read_table().column_names
    from spear.pipeline.train_job import plan_training_data

    assert plan_training_data(old_store).roles == ("speech",)

    # one cut changed (shorter): only it is tokenised again, and its new row replaces the old one
    from lhotse import CutSet

    cuts = {}
    for c in CutSet.from_file(corpus.manifest2):
        cuts.setdefault(c.id, c)
    cuts["a-1"] = cuts["a-1"].truncate(duration=2.5, preserve_id=True)
    changed = tmp_path / "changed.jsonl.gz"
    CutSet.from_cuts(cuts.values()).to_file(changed)
    third = run_tokenize(cfg_for(out, [("m3", "speech", changed)]), progress=False)
    assert (third.pending_objects, third.new_objects) == (1, 1) and third.token_version == first.token_version
    table = store.read_table(["cut_id", "duration"])
    live = {r["cut_id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(live) == len(GOOD_1) + len(ADDED) and live["a-1"]["duration"] == 2.5


@pytest.mark.slow
def test_a_shar_directory_on_s3_tokenises_into_s3(ray_cluster, corpus, s3_server, s3_storage):
    root = f"s3://{s3_server.bucket}/shar-{uuid.uuid4().hex[:8]}"
    for f in sorted(os.listdir(corpus.root / "shar")):
        s3_storage.write_bytes(f"{root}/in/{f}", (corpus.root / "shar" / f).read_bytes())
    out = f"{root}/out"
    summary = run_tokenize(cfg_for(out, [("s", "speech", f"{root}/in")], s3_storage), progress=False)
    assert summary.new_objects == len(GOOD_1) and summary.quarantined == []
    store = TokenStore(out, summary.token_version, s3_storage)
    table = store.read_table(META)
    check_rows(table, GOOD_1, shar=True)
    assert pc.all(pc.equal(table["speech_frame_rate"], table["speech_frame_rate"][0])).as_py()


def test_spear_plan_counts_a_manifest_by_its_cut_durations(corpus):
    from spear.pipeline.plan import corpus_hours

    cfg = load_config(None)
    cfg.corpus.sources = [SourceConfig(uri=str(corpus.manifest1), domain="speech")]
    hours, speech_share = corpus_hours(cfg)
    listed = sum(spec[2] for spec in GOOD_1.values()) + 1.5 + 2.0 + 5.0   # good cuts + gone, past, long
    assert abs(hours * 3600 - listed) < 1e-6 and speech_share == 1.0
