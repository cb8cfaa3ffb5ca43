"""The decode job on a real Ray cluster, over local disk and SeaweedFS."""

import io
import json

import numpy as np
import pyarrow.compute as pc
import pytest
import soundfile as sf

from spear.cluster.storage import join_uri
from spear.config import SourceConfig, load_config
from spear.pipeline.decode_job import read_quarantine, read_segments, run_decode
from spear.stages.audio import flac_decode
from spear.stages.catalog import build_catalog

from support.audio_files import encode, make_signal
from support.configs import storage_sets

GOOD = {  # relative path -> (codec, rate, channels, seconds)
    "a/long.flac": ("flac", 44100, 2, 9.5),
    "a/short.wav": ("wav", 16000, 1, 1.2),
    "b/tone.ogg": ("vorbis", 22050, 2, 2.0),
    "b/x.opus": ("opus", 48000, 1, 1.5),
    "c/m.mp3": ("mp3", 8000, 2, 2.0),
}


def _wav_bytes(x, subtype="PCM_16"):
    b = io.BytesIO()
    sf.write(b, x, 16000, format="WAV", subtype=subtype)
    return b.getvalue()


BAD = {  # relative path -> (bytes, expected reason substring)
    "bad/empty.wav": (lambda: b"", "empty object"),
    "bad/garbage.mp3": (lambda: b"ID3 but really just text " * 40, "unsupported or corrupt"),
    "bad/cut.flac": (lambda: encode(make_signal(44100, 1, 4.0), 44100, "flac")[:9000], "corrupt audio"),
    "bad/cut.wav": (lambda: _wav_bytes(make_signal(16000, 1, 2.0))[:20000], "truncated"),
    "bad/silent0.wav": (lambda: _wav_bytes(np.zeros((0, 1), np.float32)), "zero-length"),
    "bad/nan.wav": (lambda: _wav_bytes(np.full((8000, 1), np.nan, np.float32), "FLOAT"), "non-finite"),
    "bad/vanishes.flac": (lambda: encode(make_signal(16000, 1, 1.0), 16000, "flac"), "vanished"),
}
PARTIAL = {"bad/cut.flac", "bad/cut.wav"}  # cut off: their decodable part is kept, and noted in the quarantine table


def _write_corpus(st, root):
    for rel, (codec, rate, ch, sec) in GOOD.items():
        st.write_bytes(join_uri(root, rel), encode(make_signal(rate, ch, sec), rate, codec))
    for rel, (make, _) in BAD.items():
        st.write_bytes(join_uri(root, rel), make())
    st.write_bytes(join_uri(root, "a", "readme.txt"), b"not listed: wrong extension")


def _cfg(st, root, out, extra=()):
    sets = [f"output={out}", "decode.max_segment_seconds=4", "decode.objects_per_task=3",
            "decode.segments_per_file=4"] + list(extra) + storage_sets(st)
    cfg = load_config(None, sets)
    cfg.corpus.sources = [SourceConfig(uri=root, domain="speech", name="corpus"),
                          SourceConfig(uri=join_uri(root, "does-not-exist"), domain="audio", name="missing")]
    return cfg


@pytest.mark.slow
def test_bad_input_is_quarantined_and_every_good_object_comes_through(ray_cluster, storage_root):
    st, root = storage_root
    _write_corpus(st, join_uri(root, "in"))
    cfg = _cfg(st, join_uri(root, "in"), join_uri(root, "out"))
    catalog = build_catalog(cfg.corpus.sources, st)
    st.delete(join_uri(root, "in", "bad", "vanishes.flac"))  # gone between listing and reading

    summary = run_decode(cfg, catalog=catalog, progress=False)

    assert summary.objects == len(GOOD) + len(BAD) + 1  # + the unreadable prefix
    assert summary.decoded_objects == len(GOOD) + len(PARTIAL)
    reasons = {q["uri"].rsplit("/in/", 1)[-1]: q["reason"] for q in summary.quarantined}
    for rel, (_, expected) in BAD.items():
        assert expected in reasons[rel], (rel, reasons.get(rel))
    assert any("does-not-exist" in q["uri"] and "does not exist" in q["reason"] for q in summary.quarantined)

    segs = read_segments(cfg.output, st)
    assert segs.num_rows == summary.segments
    by_obj = {}
    for row in segs.select(["relative_path", "offset", "num_samples", "duration", "audio"]).to_pylist():
        by_obj.setdefault(row["relative_path"], []).append(row)
    assert set(by_obj) == set(GOOD) | PARTIAL
    for rel, (codec, rate, ch, sec) in GOOD.items():
        rows = sorted(by_obj[rel], key=lambda r: r["offset"])
        total = sum(r["num_samples"] for r in rows)
        assert abs(total - sec * 16000) <= (2 if codec in ("wav", "flac") else 0.1 * 16000)
        # contiguous, every sample once, each at most 4 s
        assert [r["offset"] for r in rows] == list(np.cumsum([0] + [r["num_samples"] for r in rows[:-1]]))
        assert all(r["num_samples"] <= 4 * 16000 for r in rows)
        assert all(len(flac_decode(r["audio"])) == r["num_samples"] for r in rows)
    assert abs(summary.audio_seconds - float(pc.sum(segs["duration"]).as_py())) < 1e-6

    q = read_quarantine(cfg.output, st)
    assert q.num_rows == len(summary.quarantined)
    kept = {u.rsplit("/in/", 1)[-1]: k for u, k in zip(q["uri"].to_pylist(), q["kept_seconds"].to_pylist()) if k is not None}
    assert set(kept) == PARTIAL and all(reasons[rel].startswith(f"partial: kept {kept[rel]:.1f} s of ~") for rel in PARTIAL)
    assert all(kept[rel] == pytest.approx(sum(r["duration"] for r in by_obj[rel])) for rel in PARTIAL)
    assert set(q.column_names) >= {"uri", "stage", "reason"}
    manifest = json.loads(st.read_text(join_uri(cfg.output, "decode.json")))
    assert manifest["summary"]["segments"] == summary.segments


@pytest.mark.slow
@pytest.mark.s3
def test_seaweedfs_and_local_disk_give_identical_segments(ray_cluster, s3_storage, tmp_path):
    from spear.cluster.storage import Storage

    # the same bytes on both (Ogg files carry a random stream serial, so encode once)
    files = {rel: encode(make_signal(rate, ch, sec), rate, codec) for rel, (codec, rate, ch, sec) in GOOD.items()}
    results = []
    for st, root in [(Storage(), str(tmp_path / "local")), (s3_storage, "s3://spear/identical")]:
        for rel, data in files.items():
            st.write_bytes(join_uri(root, "in", rel), data)
        cfg = _cfg(st, join_uri(root, "in"), join_uri(root, "out"))
        cfg.corpus.sources = cfg.corpus.sources[:1]
        run_decode(cfg, progress=False)
        results.append(read_segments(cfg.output, st, columns=["segment_id", "relative_path", "offset", "audio"]))
    local, remote = results
    assert local.num_rows > len(GOOD)
    assert local["segment_id"].to_pylist() == remote["segment_id"].to_pylist()
    assert local["audio"].to_pylist() == remote["audio"].to_pylist()


@pytest.mark.slow
def test_existing_output_is_not_overwritten_without_consent(ray_cluster, tmp_path):
    from spear.cluster.storage import Storage, StorageError

    st = Storage()
    root = str(tmp_path)
    st.write_bytes(join_uri(root, "in", "a.wav"), encode(make_signal(16000, 1, 1.0), 16000, "wav"))
    cfg = _cfg(st, join_uri(root, "in"), join_uri(root, "out"))
    cfg.corpus.sources = cfg.corpus.sources[:1]
    first = run_decode(cfg, progress=False)
    with pytest.raises(StorageError, match="already holds a decode result"):
        run_decode(cfg, progress=False)
    again = run_decode(cfg, progress=False, overwrite=True)
    assert read_segments(cfg.output, st)["segment_id"].to_pylist() == \
        sorted(s for s in read_segments(cfg.output, st)["segment_id"].to_pylist())
    assert first.segments == again.segments == 1
