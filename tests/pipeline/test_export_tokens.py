"""`spear export-tokens`: a token dataset made by `spear tokenize` from real audio, exported as Lhotse Shar and as
a Lhotse CutSet manifest (local disk and SeaweedFS), read back with Lhotse's own readers and compared array for
array with the Parquet shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spear.cluster.storage import Storage, join_uri
from spear.pipeline.export_tokens import ExportRequestError, run_export_tokens
from spear.pipeline.ledger import TokenStore
from spear.schemas.shards import decode_tokens
from spear.stages.audio import flac_decode

from support.configs import tokenize_cfg
from support.corpus import write_mixed_corpus


@pytest.mark.slow
def test_lhotse_manifest_tokenize_export_round_trip(ray_cluster, tmp_path):
    """A CutSet written by Lhotse -> `spear tokenize` -> export -> CutSet.from_shar: the same cut ids, durations,
    supervisions and audio as the manifest, the same token arrays as the Parquet shards."""
    from lhotse import CutSet

    from spear.config import SourceConfig, load_config
    from spear.pipeline.tokenize_job import run_tokenize
    from support.lhotse_corpus import GOOD_1, SPEAKERS, TEXTS, make_lhotse_corpus

    corpus = make_lhotse_corpus(tmp_path / "lhotse")
    cfg = load_config(None, [f"output={tmp_path / 'T'}", "mvq.speech_codebooks=4", "mvq.codebook_size=16",
                             "mvq.sample_frames=1000", "decode.max_segment_seconds=4"])
    cfg.corpus.sources = [SourceConfig(uri=str(corpus.manifest1), domain="speech", name="m")]
    summary = run_tokenize(cfg, progress=False)
    s = run_export_tokens(cfg.output, str(tmp_path / "shar"), shard_size=2, progress=False)
    assert s.cuts == len(GOOD_1) and s.renamed_ids == 0   # the bad cuts were quarantined, not exported

    exported = {c.id: c for c in CutSet.from_shar(in_dir=str(tmp_path / "shar"))}
    originals: dict = {}
    for c in CutSet.from_file(corpus.manifest1):
        originals.setdefault(c.id, c)                     # the manifest repeats one id: the first one was tokenised
    assert sorted(exported) == sorted(GOOD_1)
    for cid, cut in exported.items():
        assert cut.duration == pytest.approx(originals[cid].duration, abs=1e-9)
        assert cut.supervisions[0].speaker == SPEAKERS.get(cid) and cut.supervisions[0].text == TEXTS.get(cid)
        if originals[cid].sampling_rate == 16000 and not isinstance(originals[cid].channel, list):
            # 16 kHz PCM-16 recordings, one channel: the exported samples are the manifest cut's own
            assert np.array_equal(cut.load_audio(), originals[cid].load_audio())
    info = TokenStore(cfg.output, summary.token_version).version_info()
    assert_cuts_match(exported.values(), shard_rows(cfg.output, summary.token_version), info, mixed=False)


@pytest.fixture(scope="module")
def tokens(ray_cluster, tmp_path_factory):
    """(token output, TokenizeSummary): 3 speech + 2 audio files of real audio, tokenised with the weight-free teachers."""
    from spear.pipeline.tokenize_job import run_tokenize

    root = str(tmp_path_factory.mktemp("export-tokens"))
    st = Storage()
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=3, n_audio=2, seed=3)
    cfg = tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out"))
    summary = run_tokenize(cfg, progress=False)
    assert summary.committed_segments > 5
    return cfg.output, summary


def shard_rows(output: str, version: str, storage: Storage | None = None) -> dict[str, dict]:
    """The live rows as the project's reader gives them, by expected cut id (cut_id, else segment id)."""
    table = TokenStore(output, version, storage or Storage()).read_table()
    return {(r.get("cut_id") or r["segment_id"]): r for r in table.to_pylist()}


def assert_cuts_match(cuts, rows: dict[str, dict], version_info: dict, mixed: bool = True) -> None:
    cuts = list(cuts)
    assert sorted(c.id for c in cuts) == sorted(rows)
    teachers = version_info["teachers"]
    fields = {"speech": "codebook_indexes", "audio": "audio_codebook_indexes"}
    for cut in cuts:
        row = rows[cut.id]
        assert cut.duration == pytest.approx(row["num_samples"] / 16000, abs=1e-9)
        assert cut.sampling_rate == 16000
        audio = cut.load_audio()
        assert audio.shape == (1, row["num_samples"])
        assert np.array_equal(audio[0], flac_decode(row["audio"]))  # FLAC both ways: lossless
        assert cut.task_id == {"speech": 1, "audio": 2}[row["domain"]]
        assert cut.spear_segment_id == row["segment_id"] and cut.source_uri == row["source_uri"]
        assert cut.source_path == row["relative_path"]
        assert cut.source_offset == pytest.approx(row["offset"] / 16000)
        assert len(cut.supervisions) == 1 and cut.supervisions[0].duration == pytest.approx(cut.duration)
        sup = cut.supervisions[0]
        assert (sup.speaker, sup.language, sup.text) == (row.get("speaker"), row.get("language"), row.get("text"))
        for role, name in fields.items():
            expected = decode_tokens(row.get(f"{role}_tokens"), row.get(f"{role}_num_frames"),
                                     row.get(f"{role}_num_codebooks"))
            if expected is None:
                assert not cut.has_custom(name), (cut.id, name)  # speech cuts: no audio-teacher tokens
                continue
            got = cut.load_custom(name)
            assert got.dtype == np.uint8 and np.array_equal(got, expected), (cut.id, role)
            arr = getattr(cut, name)
            assert arr.frame_shift == pytest.approx(1.0 / teachers[role]["frame_rate"]) and arr.temporal_dim == 0
    if mixed:  # speech and audio data: audio-teacher tokens on the audio cuts only
        assert any(c.has_custom("audio_codebook_indexes") for c in cuts)
    assert any(not c.has_custom("audio_codebook_indexes") for c in cuts)


def test_shar_round_trip_local_relative_dest(tokens, tmp_path, monkeypatch):
    from lhotse import CutSet

    output, summary = tokens
    monkeypatch.chdir(tmp_path)
    s = run_export_tokens(output, "exports/shar", shard_size=3, progress=False)
    rows = shard_rows(output, summary.token_version)
    # file sources carry no cut metadata: null in the shards (not the string "nan"), so ids are the segment ids
    assert all(r[c] is None for r in rows.values() for c in ("cut_id", "speaker", "language", "text"))
    assert s.cuts == len(rows) and s.shards == -(-len(rows) // 3) and s.token_version == summary.token_version
    assert s.fields == {"speech": "codebook_indexes", "audio": "audio_codebook_indexes"}
    assert s.cuts_with_tokens["speech"] == len(rows) > s.cuts_with_tokens["audio"] > 0
    names = sorted(os.listdir(tmp_path / "exports" / "shar"))
    assert "cuts.000000.jsonl.gz" in names and "recording.000000.tar" in names and "codebook_indexes.000000.tar" in names
    assert all(os.path.exists(f) for f in s.files) and len(s.files) == 4 * s.shards
    info = TokenStore(output, summary.token_version).version_info()
    assert_cuts_match(CutSet.from_shar(in_dir=str(tmp_path / "exports" / "shar")), rows, info)


def test_cuts_manifest_round_trip_from_another_directory(tokens, tmp_path, monkeypatch):
    from lhotse import CutSet

    output, summary = tokens
    monkeypatch.chdir(tmp_path)
    s = run_export_tokens(output, "~/../" + os.path.relpath(tmp_path / "cuts", os.path.expanduser("~/..")),
                          fmt="lhotse-cuts", shard_size=4, progress=False)
    assert s.files == [str(tmp_path / "cuts" / "cuts.jsonl.gz")]
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the manifest names its files absolutely: it reads from any working directory
    cuts = CutSet.from_file(str(tmp_path / "cuts" / "cuts.jsonl.gz"))
    info = TokenStore(output, summary.token_version).version_info()
    assert_cuts_match(cuts, shard_rows(output, summary.token_version), info)


def test_shar_round_trip_on_seaweedfs(tokens, s3_storage, s3_server, tmp_path):
    from lhotse import CutSet

    output, summary = tokens
    dest = f"s3://{s3_server.bucket}/lhotse-export-{os.getpid()}"
    s = run_export_tokens(output, dest, shard_size=4, storage=s3_storage, progress=False)
    listed = sorted(e.uri for e in s3_storage.list_files(dest))
    assert listed == sorted(s.files) and all(f.startswith(dest + "/") for f in s.files)
    local = tmp_path / "fetched"  # Lhotse reads what the bucket holds, fetched byte for byte through Storage
    local.mkdir()
    for uri in listed:
        (local / uri.rsplit("/", 1)[1]).write_bytes(s3_storage.read_bytes(uri))
    info = TokenStore(output, summary.token_version).version_info()
    assert_cuts_match(CutSet.from_shar(in_dir=str(local)), shard_rows(output, summary.token_version), info)
    with pytest.raises(ExportRequestError, match="not empty"):
        run_export_tokens(output, dest, storage=s3_storage, progress=False)


def test_cuts_manifest_on_seaweedfs_names_its_files_by_url(tokens, s3_storage, s3_server, tmp_path):
    """lhotse-cuts to S3: the manifest's recordings and arrays are s3:// URLs of the uploaded files (Lhotse would
    read them through smart_open[s3], not installed here: the files are fetched through Storage and checked)."""
    import io

    from lhotse import CutSet

    output, summary = tokens
    dest = f"s3://{s3_server.bucket}/lhotse-cuts-{os.getpid()}"
    s = run_export_tokens(output, dest, fmt="lhotse-cuts", shard_size=3, storage=s3_storage, progress=False)
    assert s.files == [f"{dest}/cuts.jsonl.gz"]
    local = tmp_path / "cuts.jsonl.gz"
    local.write_bytes(s3_storage.read_bytes(s.files[0]))
    rows = shard_rows(output, summary.token_version)
    cuts = list(CutSet.from_file(str(local)))
    assert sorted(c.id for c in cuts) == sorted(rows)
    for cut in cuts:
        row = rows[cut.id]
        src = cut.recording.sources[0]
        assert src.type == "url" and src.source.startswith(dest + "/recordings/")
        assert s3_storage.read_bytes(src.source) == row["audio"]          # the shard's FLAC, byte for byte
        arr = cut.codebook_indexes.array
        assert arr.storage_type == "numpy_files" and arr.storage_path == f"{dest}/codebook_indexes"
        got = np.load(io.BytesIO(s3_storage.read_bytes(f"{arr.storage_path}/{arr.storage_key}")))
        assert np.array_equal(got, decode_tokens(row["speech_tokens"], row["speech_num_frames"],
                                                 row["speech_num_codebooks"]))
    # nothing else under DEST: a FLAC per cut, an array per cut and teacher, the manifest
    assert len(s3_storage.list_files(dest)) == 1 + len(rows) + sum(s.cuts_with_tokens.values())


def test_several_token_versions_need_version(tokens, tmp_path):
    import shutil

    from spear.config import ConfigError

    output, summary = tokens
    out = tmp_path / "two"
    shutil.copytree(output, out)
    shutil.copytree(out / "tokens" / summary.token_version, out / "tokens" / "tv-copy")  # a second version, as moved
    with pytest.raises(ConfigError, match=r"several token versions .*tv-copy.*: set --version"):
        run_export_tokens(str(out), str(tmp_path / "x"), progress=False)
    assert not (tmp_path / "x").exists()  # nothing written for a request that failed
    s = run_export_tokens(str(out), str(tmp_path / "y"), version="tv-copy", progress=False, shard_size=100)
    assert s.token_version == "tv-copy" and s.cuts == summary.committed_segments and s.shards == 1


def spear(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_cli_json_summary_and_one_line_errors(tokens, tmp_path):
    output, summary = tokens
    r = spear("export-tokens", output, "out-shar", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["format"] == "lhotse-shar" and d["cuts"] == summary.committed_segments
    assert d["dest"] == str(tmp_path / "out-shar") and "[export-tokens]" in r.stderr  # progress on stderr

    r = spear("export-tokens", output, "out-shar", cwd=tmp_path)  # DEST not empty
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: out-shar is not empty: export into a new or empty location (an interrupted export leaves its partial "
        "files: remove them)"]
    r = spear("export-tokens", output, "x", "--version", "tv-nope", cwd=tmp_path)
    assert r.returncode == 2 and "--version tv-nope is not at" in r.stderr and summary.token_version in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = spear("export-tokens", str(tmp_path / "missing"), "y", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = spear("export-tokens", str(tmp_path / "empty"), "z", cwd=tmp_path)
    assert r.returncode == 2 and "no token dataset at" in r.stderr and len(r.stderr.strip().splitlines()) == 1
