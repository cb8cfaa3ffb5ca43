"""Post-training data: manifests read, bad rows set aside with reasons, audio decoded on Ray, tables reused.

Real audio files written by libsndfile (wav, flac, ogg at several rates, stereo), real damage (a missing
file, random bytes, an empty file, a 0.1 s file), the shared Ray cluster and SeaweedFS for s3://.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from spear.cluster.storage import Storage
from spear.config import ConfigError
from spear.schemas.posttrain_data import POSTTRAIN_UTTERANCE_SCHEMA, parse_quarantine_jsonl
from spear.schemas.versioning import FormatError
from spear.stages.audio import flac_decode_pcm16
from spear.stages.posttrain_data import (NOTE_EMPTY_TEXT, NOTE_NO_SPEAKER, PostTrainDataError,
                                         prepare_posttrain_data, read_manifests, read_prepared)

from support.audio_files import encode, make_signal

# name -> (codec, rate, channels, seconds)
GOOD_AUDIO = {"a.wav": ("wav", 22050, 1, 1.0), "b.flac": ("flac", 16000, 1, 1.5), "c.ogg": ("vorbis", 44100, 1, 1.0),
              "st.flac": ("flac", 48000, 2, 2.0), "short.wav": ("wav", 16000, 1, 0.1)}

TRAIN_CSV = """id,audio,start,duration,channel,speaker,language,text,pivot
u1,audio/a.wav,,,,spk1,en,hello there,
u2,audio/b.flac,,,,spk2,de,guten tag,good day
u3,audio/missing.wav,,,,spk1,en,gone,
u4,audio/corrupt.wav,,,,spk2,en,noise,
u5,audio/c.ogg,,,,spk1,fr,,
u1,audio/b.flac,,,,spk3,en,the same id again,
u7,audio/a.wav,0.2,,,,,,
u8,audio/empty.wav,,,,spk1,en,nothing,
u9,audio/short.wav,,,,spk1,en,short,
u10,audio/a.wav,5.0,,,spk1,en,past the end,
u11,audio/a.wav,abc,,,spk1,en,bad start,
u12,audio/st.flac,0.5,1.0,1,spk3,es,hola,hello
"""
# ids set aside and the kind of problem each
EXPECTED_BAD = {"u3": "missing audio", "u4": "corrupt audio", "u1": "duplicate id", "u7": "no label",
                "u8": "empty audio", "u9": "too short", "u10": "offset past end", "u11": "bad start/duration"}

EVAL_JSONL = [{"id": "e1", "audio": "audio/a.wav", "speaker": "spk9", "language": "en", "text": "hello there",
               "pivot": "hello there", "sentence": "s1"},
              "{this line is not json",
              {"id": "e2", "uri": "audio/b.flac", "speaker": "spk9", "text": "guten tag", "pivot": "hello there",
               "sentence": "s1"}]

EXTRA_TSV = "audio\tspeaker\ttext\naudio/c.ogg\tspk4\tbonjour\n"


def write_corpus(root) -> dict[str, str]:
    audio = root / "audio"
    audio.mkdir(parents=True)
    for name, (codec, rate, channels, seconds) in GOOD_AUDIO.items():
        (audio / name).write_bytes(encode(make_signal(rate, channels, seconds), rate, codec))
    rng = np.random.default_rng(0)
    (audio / "corrupt.wav").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (audio / "empty.wav").write_bytes(b"")
    (root / "train.csv").write_text(TRAIN_CSV)
    (root / "extra.tsv").write_text(EXTRA_TSV)
    (root / "eval.jsonl").write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in EVAL_JSONL))
    return {"train": str(root / "train.csv"), "extra": str(root / "extra.tsv"), "eval": str(root / "eval.jsonl")}


@pytest.fixture
def corpus(tmp_path):
    return tmp_path / "corpus", write_corpus(tmp_path / "corpus")


def test_manifests_are_read_checked_decoded_and_reused(corpus, tmp_path, monkeypatch, ray_cluster):
    root, paths = corpus
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # relative manifest paths, audio relative to each manifest's folder
    train = [os.path.relpath(paths["train"]), os.path.relpath(paths["extra"])]
    lines: list[str] = []
    prepared = prepare_posttrain_data(train, [os.path.relpath(paths["eval"])], "out/data", Storage(),
                                      progress=lines.append)
    assert not prepared.reused and lines
    assert prepared.train_uri == str(elsewhere / "out/data/train.parquet")

    bad = parse_quarantine_jsonl(Storage().read_text(prepared.quarantine_uri), "quarantine.jsonl")
    by_id = {q["id"]: q for q in bad if q["id"]}
    assert {k: by_id[k]["kind"] for k in EXPECTED_BAD} == EXPECTED_BAD
    assert by_id["u1"]["row"] == 7 and "row 2" in by_id["u1"]["reason"]       # CSV: the header is line 1
    assert by_id["u3"]["audio"] == str(root / "audio/missing.wav") and by_id["u3"]["stage"] == "read"
    assert "offset past the end" in by_id["u10"]["reason"]
    json_line = [q for q in bad if q["kind"] == "bad manifest row"]
    assert len(json_line) == 1 and json_line[0]["row"] == 2 and json_line[0]["manifest"].endswith("eval.jsonl")
    assert all("\n" not in q["reason"] for q in bad)
    assert prepared.quarantined == len(bad) == len(EXPECTED_BAD) + 1
    assert prepared.quarantine_reasons["missing audio"] == 1

    table = read_prepared(prepared.train_uri, Storage())
    assert table.schema.equals(POSTTRAIN_UTTERANCE_SCHEMA, check_metadata=True)
    rows = {r["utt_id"]: r for r in table.to_pylist()}
    assert list(rows)[:4] == ["u1", "u2", "u5", "u12"]        # the manifests' order, train.csv first
    assert len(rows) == 5 and prepared.rows == {"train": 5, "eval": 2}
    extra_id = str(root / "audio/c.ogg")                        # no id column: the audio's location is the id
    assert rows[extra_id]["speaker"] == "spk4" and rows[extra_id]["source"] == paths["extra"]
    # decoded to 16 kHz mono: a 22.05 kHz second is 16000 samples, a stereo range is one channel's range
    assert rows["u1"]["num_samples"] == 16000 and flac_decode_pcm16(rows["u1"]["audio"]).size == 16000
    assert rows["u12"]["num_samples"] == 16000
    ref = make_signal(48000, 2, 2.0)[24000:72000, 1]
    got = flac_decode_pcm16(rows["u12"]["audio"]).astype(np.float64) / 32768
    assert np.abs(got[100:-100] - ref[::3][100:-100]).max() < 0.01
    assert rows["u2"]["pivot"] == "good day" and rows["u2"]["sentence"] == "good day"
    assert rows["u5"]["text"] is None and rows["u1"]["sentence"] is None
    assert prepared.label_notes == {NOTE_EMPTY_TEXT: 1}
    assert prepared.speakers == {"train": ["spk1", "spk2", "spk3", "spk4"], "eval": ["spk9"]}
    assert prepared.languages["train"] == ["de", "en", "es", "fr"]
    assert prepared.seconds["train"] == pytest.approx(1.0 + 1.5 + 1.0 + 1.0 + 1.0, abs=0.01)

    ev = read_prepared(prepared.eval_uri, Storage()).to_pylist()
    assert [r["utt_id"] for r in ev] == ["e1", "e2"] and {r["split"] for r in ev} == {"eval"}
    assert [r["sentence"] for r in ev] == ["s1", "s1"]
    assert "5 utterances" in prepared.human() and "missing audio: 1" in prepared.human()

    # A second run with the same manifests reuses the tables (written once: same mtime).
    mtime = os.stat(prepared.train_uri).st_mtime_ns
    again = prepare_posttrain_data(train, [os.path.relpath(paths["eval"])], str(elsewhere / "out/data"), Storage(),
                                   progress=False)
    assert again.reused and os.stat(prepared.train_uri).st_mtime_ns == mtime
    assert again.rows == prepared.rows and again.quarantine_reasons == prepared.quarantine_reasons

    # A changed manifest prepares again.
    with open(paths["extra"], "a") as f:
        f.write("audio/b.flac\tspk5\tmore\n")
    third = prepare_posttrain_data(train, [os.path.relpath(paths["eval"])], "out/data", Storage(), progress=False)
    assert not third.reused and third.rows["train"] == 6 and "spk5" in third.speakers["train"]


def test_wrong_tables_and_manifests_are_one_line_errors(corpus, tmp_path, ray_cluster):
    root, paths = corpus
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"utt_id": ["x"]}), other)
    with pytest.raises(FormatError, match="not a prepared post-training table"):
        read_prepared(str(other), Storage())
    newer = POSTTRAIN_UTTERANCE_SCHEMA.empty_table().replace_schema_metadata(
        {**POSTTRAIN_UTTERANCE_SCHEMA.metadata, b"spear.version": b"99"})
    pq.write_table(newer, other)
    with pytest.raises(FormatError, match="version 99, newer than this spear reads"):
        read_prepared(str(other), Storage())
    with pytest.raises(ConfigError, match=r"posttrain.eval_manifests\[0\]: .*nope.csv does not exist"):
        prepare_posttrain_data([paths["train"]], [str(root / "nope.csv")], str(tmp_path / "d"), Storage())
    with pytest.raises(ConfigError, match="posttrain.train_manifests is empty"):
        prepare_posttrain_data([], [], str(tmp_path / "d"), Storage())
    only_bad = root / "bad.csv"
    only_bad.write_text("audio,speaker\naudio/missing.wav,s1\naudio/corrupt.wav,s2\n")
    with pytest.raises(PostTrainDataError, match="no usable training utterance.*missing audio: 1"):
        prepare_posttrain_data([str(only_bad)], [], str(tmp_path / "d"), Storage(), progress=False)
    assert len(Storage().read_text(str(tmp_path / "d/quarantine.jsonl")).splitlines()) == 2


def test_home_relative_manifest(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    monkeypatch.setenv("HOME", str(tmp_path))
    items, bad, notes = read_manifests(["~/corpus/train.csv"], [], Storage())
    assert {i["audio"] for i in items} >= {str(root / "audio/a.wav"), str(root / "audio/st.flac")}
    assert items[0]["source"] == str(root / "train.csv")
    assert notes == {NOTE_EMPTY_TEXT: 1} and {q["kind"] for q in bad} == {"duplicate id", "no label",
                                                                          "bad start/duration"}


def test_manifest_and_audio_on_s3(corpus, s3_server, s3_storage, ray_cluster):
    root, paths = corpus
    base = f"s3://{s3_server.bucket}/pt-{uuid.uuid4().hex[:8]}"
    for name in os.listdir(root / "audio"):
        s3_storage.write_bytes(f"{base}/corpus/audio/{name}", (root / "audio" / name).read_bytes())
    s3_storage.write_text(f"{base}/corpus/train.csv", TRAIN_CSV)
    prepared = prepare_posttrain_data([f"{base}/corpus/train.csv"], [], f"{base}/out/data", s3_storage,
                                      progress=False)
    assert prepared.train_uri == f"{base}/out/data/train.parquet" and prepared.eval_uri is None
    table = read_prepared(prepared.train_uri, s3_storage)
    assert table["utt_id"].to_pylist() == ["u1", "u2", "u5", "u12"]
    assert prepared.quarantine_reasons["missing audio"] == 1 and prepared.quarantine_reasons["corrupt audio"] == 1
    bad = parse_quarantine_jsonl(s3_storage.read_text(prepared.quarantine_uri), "q")
    assert next(q for q in bad if q["id"] == "u3")["audio"] == f"{base}/corpus/audio/missing.wav"
    assert prepare_posttrain_data([f"{base}/corpus/train.csv"], [], f"{base}/out/data", s3_storage,
                                  progress=False).reused


def test_lhotse_cutset_manifest(tmp_path, ray_cluster):
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    from support.lhotse_corpus import make_lhotse_corpus

    corpus = make_lhotse_corpus(tmp_path / "lhotse")
    rec = Recording.from_file(corpus.audio / "long_a.flac", recording_id="long_a")
    sup = SupervisionSegment(id="p-s", recording_id="long_a", start=1.0, duration=2.0, speaker="spk7",
                             language="de", text="guten morgen", custom={"pivot": "good morning"})
    cut = MonoCut(id="p", start=1.0, duration=2.0, channel=0, recording=rec, supervisions=[sup],
                  custom={"sentence": "greeting-1"})
    pivots = tmp_path / "pivots.jsonl"
    CutSet.from_cuts([cut]).to_file(pivots)       # uncompressed JSONL: told from a labelled table by its content

    items, bad, notes = read_manifests([str(corpus.manifest1), str(pivots)], [], Storage())
    kinds = {q["id"]: q["kind"] for q in bad}
    assert kinds["a-0"] == "duplicate id" and kinds["mixed"] == "unsupported cut"
    assert kinds["b-0"] == "no label"           # a cut without supervisions has nothing to learn from
    got = {i["utt_id"]: i for i in items}
    assert got["p"]["pivot"] == "good morning" and got["p"]["sentence"] == "greeting-1"
    assert got["p"]["speaker"] == "spk7" and got["p"]["language"] == "de" and got["p"]["start"] == 1.0
    assert got["a-1"]["text"] == "second part" and NOTE_NO_SPEAKER in notes

    prepared = prepare_posttrain_data([str(corpus.manifest1), str(pivots)], [], str(tmp_path / "d"), Storage(),
                                      progress=False)
    table = read_prepared(prepared.train_uri, Storage()).to_pylist()
    rows = {r["utt_id"]: r for r in table}
    assert rows["p"]["num_samples"] == 32000 and rows["a-0"]["num_samples"] == 48000
    expected = sf.read(corpus.audio / "long_a.flac", dtype="int16")[0][16000:48000]
    assert np.array_equal(flac_decode_pcm16(rows["p"]["audio"]), expected)
    assert "gone" not in rows and "b-0" not in rows and prepared.quarantine_reasons["no label"] >= 2
