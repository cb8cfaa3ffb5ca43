"""One token dataset as corpora arrive, codebooks on little data, honest figures, no-op runs without Ray.

All on the real tiny demo corpus (espeak-ng speech, synthetic events) and the weight-free teachers,
with the session's embedded Ray; the no-op run is a real `spear tokenize` subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from spear.cluster.storage import Storage
from spear.config import ConfigError, SourceConfig, load_config
from spear.pipeline.ledger import TokenStore, list_token_versions
from spear.pipeline.tokenize_job import run_tokenize

# Small codebooks so the tiny corpus fits them (16 entries: 64 frames at the default minimum).
SETS = ["mvq.speech_codebooks=4", "mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.sample_frames=2000",
        "decode.max_segment_seconds=4", "tokenize.commit_interval_s=30"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The tiny demo corpus split in halves per domain: {"speech": [first, second], "audio": [first, second]}."""
    from spear.synthetic.corpus import generate_demo_corpus

    root = tmp_path_factory.mktemp("incremental")
    corpus = generate_demo_corpus(str(root / "demo"), size="tiny", seed=0)
    out = {}
    for domain, folder in (("speech", corpus.speech_dir), ("audio", corpus.audio_dir)):
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        out[domain] = [files[: len(files) // 2], files[len(files) // 2:]]
    return out


def arrive(files, folder) -> str:
    """Files arriving in a corpus folder (copied with their times, so their etags stay)."""
    os.makedirs(folder, exist_ok=True)
    for f in files:
        shutil.copy2(f, os.path.join(folder, os.path.basename(f)))
    return str(folder)


def cfg_for(out, sources, extra=()):
    cfg = load_config(None, [f"output={out}"] + SETS + list(extra))
    cfg.corpus.sources = [SourceConfig(uri=uri, domain=domain, name=domain) for domain, uri in sources]
    return cfg


def check_one_whole_version(out, version, speech_objects, audio_objects):
    st = Storage()
    assert list_token_versions(out, st) == [version]
    store = TokenStore(out, version, st)
    t = store.read_table(["segment_id", "source_uri", "domain", "speech_tokens", "audio_tokens"])
    assert set(t["domain"].to_pylist()) == {"speech", "audio"}
    by_domain = {d: {u for u, dd in zip(t["source_uri"].to_pylist(), t["domain"].to_pylist()) if dd == d}
                 for d in ("speech", "audio")}
    assert len(by_domain["speech"]) == speech_objects and len(by_domain["audio"]) == audio_objects
    assert pc.all(pc.is_valid(t["speech_tokens"])).as_py()
    audio = t.filter(pc.equal(t["domain"], "audio"))
    speech = t.filter(pc.equal(t["domain"], "speech"))
    assert pc.all(pc.is_valid(audio["audio_tokens"])).as_py() and speech["audio_tokens"].null_count == speech.num_rows
    # training reads the version whole: both teachers' heads
    from spear.pipeline.train_job import plan_training_data

    plan = plan_training_data(store)
    assert plan.roles == ("speech", "audio") and set(plan.seconds_by_domain) == {"speech", "audio"}
    return store


def figures(stderr: str) -> dict[str, int]:
    """The counts the job printed on stderr (its pass 2 and done lines)."""
    p2 = re.search(r"pass 2: (\d+) new or changed objects \((\d+) already committed\)", stderr)
    done = re.search(r"done: (\d+) of (\d+) new or changed objects tokenised \((\d+) segments, [\d.]+ h"
                     r"(?:; (\d+) of them kept in part)?\), (\d+) quarantined, (\d+) already committed", stderr)
    assert p2 and done, stderr
    return {"pending_objects": int(p2[1]), "skipped_objects": int(p2[2]), "new_objects": int(done[1]),
            "pending_objects_done": int(done[2]), "segments": int(done[3]), "partial": int(done[4] or 0),
            "quarantined": int(done[5]), "skipped_objects_done": int(done[6])}


@pytest.mark.slow
def test_speech_then_audio_then_interleaved_additions_extend_one_version(ray_cluster, parts, tmp_path, capsys):
    out = str(tmp_path / "T")
    speech_dir, audio_dir = tmp_path / "in" / "speech", tmp_path / "in" / "audio"
    (s1, s2), (a1, a2) = parts["speech"], parts["audio"]

    # `--input speech/ --domain speech`: the speech codebooks only
    first = run_tokenize(cfg_for(out, [("speech", arrive(s1, speech_dir))]), progress=False)
    assert set(first.codebooks) == {"speech"} and first.new_objects == len(s1) and first.ray_started

    # `--input audio/ --domain audio` into the same output: the audio codebooks are fitted now and the
    # rows join the same version; the figures on stderr are the summary's
    capsys.readouterr()
    second = run_tokenize(cfg_for(out, [("audio", arrive(a1, audio_dir))]), progress=True)
    err = capsys.readouterr().err
    assert second.token_version == first.token_version
    assert second.codebooks["audio"].fitted_now and not second.codebooks["speech"].fitted_now
    assert second.codebooks["speech"].version == first.codebooks["speech"].version
    d = second.to_dict()
    f = figures(err)
    assert f["pending_objects"] == f["pending_objects_done"] == d["pending_objects"] == len(a1)
    assert f["new_objects"] == d["new_objects"] == len(a1) and f["segments"] == d["segments"] > 0
    assert f["partial"] == d["partial_objects"] and f["quarantined"] == len(d["quarantined"]) and f["skipped_objects"] == f["skipped_objects_done"] == d["skipped_objects"]
    assert second.ray_started
    # each teacher pool says what it reserves: its actors, CPUs and the memory its teacher's footprint needs
    pools = re.findall(r"\[tokenize\] (\w+) teacher (\w+): up to (\d+) actor\(s\), 0 GPU, [\d.]+ CPU, "
                       r"([\d.]+) GiB memory each", err)
    # (pass 1 fits the audio codebooks; pass 2 runs both teachers: the speech teacher's tokens cover all data)
    assert [p[0] for p in pools] == ["audio", "speech", "audio"], err[-3000:]
    assert all(0.5 < float(p[3]) < 8 for p in pools), err[-3000:]
    # 2 audio codebooks of 16 entries fitted on the tiny audio half: below 40 frames per entry, said so
    cb = second.codebooks["audio"]
    if cb.sample_frames < 40 * 16:
        assert any(f"fitted on {cb.sample_frames} frames" in w and "640" in w for w in d["warnings"])
        assert all(f"warning: {w}" in err for w in d["warnings"])

    # interleaved: more speech, then more audio, then both folders again
    third = run_tokenize(cfg_for(out, [("speech", arrive(s2, speech_dir))]), progress=False)
    assert third.token_version == first.token_version and third.new_objects == len(s2)
    assert third.skipped_objects == len(s1)
    both = [("speech", str(speech_dir)), ("audio", arrive(a2, audio_dir))]
    fourth = run_tokenize(cfg_for(out, both), progress=False)
    assert fourth.token_version == first.token_version
    assert fourth.new_objects == len(a2) and fourth.skipped_objects == len(s1) + len(s2) + len(a1)
    assert fourth.committed_objects == len(s1) + len(s2) + len(a1) + len(a2)
    store = check_one_whole_version(out, first.token_version, len(s1) + len(s2), len(a1) + len(a2))
    info = store.version_info()
    assert set(info["teachers"]) == {"speech", "audio"} and set(info["key"]) == {"speech", "audio"}

    # nothing new: decided from the ledger in the driver, Ray never starts (a real CLI process)
    spear = os.path.join(os.path.dirname(sys.executable), "spear")
    proc = subprocess.run([spear, "tokenize", "--input", str(speech_dir), "--domain", "speech", "--output", out,
                           "--json"] + [a for s in SETS for a in ("--set", s)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    noop = json.loads(proc.stdout)
    assert noop["ray_started"] is False and noop["new_objects"] == 0 and noop["pending_objects"] == 0
    assert noop["token_version"] == first.token_version and noop["skipped_objects"] == len(s1) + len(s2)
    assert "starting Ray" not in proc.stderr
    assert f"nothing new: all {noop['skipped_objects']} objects are committed" in proc.stderr
    assert (f"done: 0 of 0 new or changed objects tokenised (0 segments, 0.000 h), {len(noop['quarantined'])} "
            f"quarantined, {noop['skipped_objects']} already committed") in proc.stderr
    assert set(noop["codebooks"]) == {"speech", "audio"}
    # a version of the first scheme (forked per domain) beside it is pointed out, not silently left
    Storage().write_text(os.path.join(out, "tokens", "tv-legacy", "version.json"), json.dumps({"teachers": {}}))
    again = run_tokenize(cfg_for(out, both), progress=False)
    assert not again.ray_started and again.new_objects == 0
    assert any("tv-legacy" in w and "train.token_version" in w for w in again.warnings)
    Storage().delete(os.path.join(out, "tokens", "tv-legacy"), recursive=True)

    # a real change (another speech teacher) is a new version beside the old
    changed = run_tokenize(cfg_for(out, [("speech", str(speech_dir))], ["teachers.speech.kind=fbank"]), progress=False)
    assert changed.token_version != first.token_version and changed.new_objects == len(s1) + len(s2)
    assert set(list_token_versions(out, Storage())) == {first.token_version, changed.token_version}


@pytest.mark.slow
def test_audio_first_then_speech_is_one_version_and_codebooks_reuse(ray_cluster, parts, tmp_path):
    out = str(tmp_path / "T")
    (s1, _), (a1, _) = parts["speech"], parts["audio"]
    audio_dir = arrive(a1, tmp_path / "in" / "audio")
    speech_dir = arrive(s1, tmp_path / "in" / "speech")
    first = run_tokenize(cfg_for(out, [("audio", audio_dir)]), progress=False)
    assert set(first.codebooks) == {"speech", "audio"}  # the speech teacher runs on every domain
    second = run_tokenize(cfg_for(out, [("speech", speech_dir)]), progress=False)
    assert second.token_version == first.token_version and second.new_objects == len(s1)
    assert not any(cb.fitted_now for cb in second.codebooks.values())
    check_one_whole_version(out, first.token_version, len(s1), len(a1))

    # Too little data for 256-entry codebooks (the default): one line with the numbers and the ways on.
    small = str(tmp_path / "small")
    with pytest.raises(ConfigError) as err:
        run_tokenize(cfg_for(small, [("audio", audio_dir)], ["mvq.codebook_size=256"]), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "too little data" in msg and "need at least 1024 (4 per entry" in msg
    assert all(k in msg for k in ("mvq.codebook_size=", "mvq.min_frames_per_entry=", "mvq.reuse_codebooks="))
    frames = int(re.search(r"(\d+) frames sampled", msg)[1])
    assert 0 < frames < 1024

    # ... and a way on it names: reuse the codebooks fitted above (same teachers, same shapes); nothing is
    # fitted, so even an impossible minimum does not matter.
    reused = run_tokenize(cfg_for(small, [("audio", audio_dir)], ["mvq.min_frames_per_entry=1000",
                                                                  f"mvq.reuse_codebooks={out}"]), progress=False)
    assert {r: cb.version for r, cb in reused.codebooks.items()} == {r: cb.version for r, cb in first.codebooks.items()}
    assert all(cb.reused_from and not cb.fitted_now for cb in reused.codebooks.values())
    assert reused.new_objects == len(a1)
    # codebooks of another shape are not taken
    with pytest.raises(ConfigError, match="no speech codebooks for teacher mfcc .* 8x16") as err:
        run_tokenize(cfg_for(str(tmp_path / "other"), [("audio", audio_dir)],
                             ["mvq.speech_codebooks=8", f"mvq.reuse_codebooks={out}"]), progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.s3
def test_the_same_corpus_moved_or_uploaded_to_s3_is_never_live_twice(ray_cluster, parts, s3_server, tmp_path):
    """A corpus tokenised from one folder, then reached from elsewhere under the same source name: the folder
    moved has nothing new (its objects keep their keys and etags); a copy uploaded to S3 (other etags) is
    tokenised again and its rows replace the earlier ones, with a warning naming an example. Before object
    keys, the S3 copy was tokenised as new objects beside the old ones: every segment live twice."""
    from support.configs import storage_sets

    out = str(tmp_path / "T")
    (s1, _), _ = parts["speech"], parts["audio"]
    speech_dir = arrive(s1, tmp_path / "in" / "speech")
    first = run_tokenize(cfg_for(out, [("speech", speech_dir)]), progress=False)
    assert first.new_objects == len(s1)

    moved = tmp_path / "elsewhere" / "speech"
    moved.parent.mkdir()
    shutil.move(speech_dir, moved)
    again = run_tokenize(cfg_for(out, [("speech", str(moved))]), progress=False)
    assert (again.new_objects, again.skipped_objects, again.ray_started) == (0, len(s1), False)

    s3 = Storage(s3_server.storage_options())
    bucket_dir = f"s3://{s3_server.bucket}/moved-corpus/speech"
    for f in sorted(moved.iterdir()):
        s3.write_bytes(f"{bucket_dir}/{f.name}", f.read_bytes())
    uploaded = run_tokenize(cfg_for(out, [("speech", bucket_dir)], storage_sets(s3)), progress=False)
    assert uploaded.new_objects == len(s1) and uploaded.committed_objects == first.committed_objects
    (warning,) = [w for w in uploaded.warnings if "committed before from another location" in w]
    assert f"{len(s1)} object(s)" in warning and bucket_dir in warning
    rows = TokenStore(out, first.token_version, Storage()).read_table(["segment_id", "source_uri"]).to_pylist()
    ids = [r["segment_id"] for r in rows]
    assert len(ids) == len(set(ids)) == first.committed_segments
    assert all(r["source_uri"].startswith(bucket_dir) for r in rows)


def test_teacher_fingerprint_follows_the_checkpoint_bytes(tmp_path):
    from spear.config import TeacherConfig
    from spear.pipeline.tokenize_job import teacher_fingerprint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"a" * 10)
    t = TeacherConfig(kind="wavlm", path=str(ckpt), layer=3)
    st = Storage()
    before = teacher_fingerprint(t, st)
    assert before == teacher_fingerprint(t, st)
    (ckpt / "model.safetensors").write_bytes(b"b" * 11)
    assert teacher_fingerprint(t, st) != before
    assert teacher_fingerprint(TeacherConfig(kind="wavlm", path=str(ckpt), layer=4), st) != teacher_fingerprint(t, st)
