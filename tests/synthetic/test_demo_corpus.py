"""The demo corpus: real espeak-ng speech and procedural events, written in every format and
read back with soundfile; labels, splits, determinism and the cache."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from spear.synthetic.corpus import CORPUS_VERSION, DemoCorpus, generate_demo_corpus
from spear.synthetic.events import EVENT_CLASSES, synth_event
from spear.synthetic.formats import FORMATS, LOSSLESS_FORMATS, SAMPLE_RATES
from spear.synthetic.plan import plan_corpus
from spear.synthetic.speech import SPEAKERS, WORDS, EspeakNotFoundError

# What soundfile reports for each of our format names: (format, subtype).
SF_FORMAT = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
             "opus": ("OGG", "OPUS"), "mp3": ("MP3", "MPEG_LAYER_III")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[DemoCorpus, list[str]]:
    messages: list[str] = []
    corpus = generate_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", size="tiny", seed=0,
                                  progress=messages.append)
    return corpus, messages


def _mtimes(corpus: DemoCorpus) -> dict[str, int]:
    return {r["path"]: (corpus.root / r["path"]).stat().st_mtime_ns for r in corpus.labels()}


def test_layout_and_summary(tiny):
    corpus, messages = tiny
    rows = corpus.labels()
    assert corpus.num_files == len(rows) and 20 <= len(rows) <= 40
    assert 10 < corpus.total_seconds < 120
    assert corpus.total_seconds == pytest.approx(sum(r["duration"] for r in rows), abs=0.01)
    meta = json.loads((corpus.root / "corpus.json").read_text())
    assert (meta["version"], meta["size"], meta["seed"], meta["num_files"]) == (CORPUS_VERSION, "tiny", 0, len(rows))
    for r in rows:
        assert r["path"].startswith(f"{r['domain']}/")
        assert (corpus.root / r["path"]).parent == (corpus.speech_dir if r["domain"] == "speech" else corpus.audio_dir)
    assert DemoCorpus.load(corpus.root) == corpus
    assert messages[0].startswith("demo corpus (tiny): generating")
    assert any(f"generated {len(rows)}/{len(rows)} files" in m for m in messages)


def test_every_format_rate_and_channel_count_appears(tiny):
    rows = tiny[0].labels()
    assert {(r["format"], r["channels"]) for r in rows} == {(f, c) for f in FORMATS for c in (1, 2)}
    assert {r["sample_rate"] for r in rows} == set(SAMPLE_RATES)
    assert {"speech", "audio"} == {r["domain"] for r in rows}
    assert {"word", "sentence", "events", "mixed", "pitched"} <= {r["kind"] for r in rows}
    for r in rows:
        assert r["sample_rate"] in FORMATS[r["format"]][3]


def test_files_read_back_as_labelled(tiny):
    corpus = tiny[0]
    for r in corpus.labels():
        path = corpus.root / r["path"]
        info = sf.info(path)
        assert (info.format, info.subtype) == SF_FORMAT[r["format"]], r["path"]
        assert info.samplerate == r["sample_rate"] and info.channels == r["channels"], r["path"]
        if r["format"] in LOSSLESS_FORMATS:
            assert info.frames == round(r["duration"] * r["sample_rate"]), r["path"]
        else:
            assert abs(info.frames / info.samplerate - r["duration"]) < 0.05, r["path"]
        x, sr = sf.read(path, always_2d=True)
        assert x.shape == (info.frames, r["channels"])
        peak = np.abs(x).max()
        assert 0.05 < peak < 0.99, (r["path"], peak)  # audible, and no clipping after lossy decoding
        assert 1.0 <= r["duration"] <= 120.0


def test_speech_and_event_labels(tiny):
    rows = tiny[0].labels()
    assert len({tuple(sorted(r)) for r in rows}) == 1  # one schema for every row
    voices = {s.voice for s in SPEAKERS}
    for r in rows:
        if r["has_speech"]:
            assert r["speaker"] in voices and r["text"]
            start, end = r["speech_span"]
            assert 0 <= start < end <= r["duration"] + 1e-3
            assert " ".join(text for _, _, text in r["speech_segments"]) == r["text"]
            assert all(start <= a < b <= end for a, b, _ in r["speech_segments"])
            if r["word"] is not None:
                assert r["word"] in WORDS and r["text"] == r["word"]
        else:
            assert r["speaker"] is None and r["text"] is None and r["word"] is None
        if r["domain"] == "speech":
            assert r["has_speech"] and r["events"] == [] and r["event_count"] == 0 and r["primary_event"] is None
        else:
            assert 1 <= r["event_count"] <= 5 and r["event_count"] == len(r["events"]) == len(r["event_times"])
            assert set(r["events"]) <= set(EVENT_CLASSES) | {"pitched"} and r["primary_event"] in r["events"]
            assert (r["events"] == ["pitched"]) == (r["kind"] == "pitched") == (r["pitch_band"] is not None)
            for start, end in r["event_times"]:
                assert 0 <= start < end <= r["duration"] + 1e-3
            assert r["has_speech"] == (r["kind"] == "mixed")
    mixed = [r for r in rows if r["kind"] == "mixed"]
    assert mixed and all(r["speaker"] and r["events"] for r in mixed)
    assert any(r["background"] for r in rows if r["domain"] == "audio")
    # Every class is the primary event of some clip; words are spoken by more than one voice.
    assert {r["primary_event"] for r in rows if r["kind"] == "events"} == set(EVENT_CLASSES)
    voices_per_word = Counter(w for w, _ in {(r["word"], r["speaker"]) for r in rows if r["kind"] == "word"})
    assert max(voices_per_word.values()) >= 2


def test_splits():
    plans = plan_corpus("demo", 0)
    assert {p.split for p in plans} == {"train", "test"}
    share = {k: sum(p.split == "test" for p in plans if p.kind == k) / sum(p.kind == k for p in plans)
             for k in ("word", "sentence", "events", "mixed", "pitched")}
    assert all(0.15 < share[k] < 0.25 for k in ("word", "sentence")), share
    # sound events, mixtures and pitched tones: half test (their tasks need ~240 / 350 / 120 test clips
    # for tight intervals)
    assert all(0.45 < share[k] < 0.55 for k in ("events", "mixed", "pitched")), share
    assert sum(p.split == "test" for p in plans if p.kind == "mixed") >= 340 and len(plans) == 1920
    assert sum(p.split == "test" for p in plans if p.kind == "events") == 240
    # Stratified: every word has clips in both splits.
    by_word: dict[str, set[str]] = {}
    for p in plans:
        if p.kind == "word":
            by_word.setdefault(p.word, set()).add(p.split)
    assert len(by_word) == len(WORDS) and all(s == {"train", "test"} for s in by_word.values())
    assert [p.split for p in plan_corpus("demo", 0)] == [p.split for p in plans]
    assert [p.split for p in plan_corpus("demo", 1)] != [p.split for p in plans]


def test_small_size_holds_half_its_sound_event_clips_out_and_the_cli_offers_every_size():
    from spear.pipeline.cli import main
    from spear.synthetic.plan import SIZES

    plans = plan_corpus("small", 0)
    events = [p for p in plans if p.kind == "events"]
    assert len(events) == 120 and sum(p.split == "test" for p in events) == 60  # frame_event: ~660 test points
    assert {p.split for p in plans if p.kind == "word"} == {"train", "test"}
    size = next(p for p in main.commands["demo"].params if p.name == "size")
    assert list(size.type.choices) == list(SIZES)


def test_deterministic_cached_and_forced(tiny, tmp_path):
    first = tiny[0]
    twin = generate_demo_corpus(tmp_path / "twin", size="tiny", seed=0)
    assert twin.labels() == first.labels()
    # Every file, lossy ones included, has the same bytes: the content hashes that segment ids, the
    # codebooks' frame sample and so the tokens derive from do not change between generations.
    assert {r["format"] for r in first.labels()} == set(FORMATS)
    for r in first.labels():
        assert (twin.root / r["path"]).read_bytes() == (first.root / r["path"]).read_bytes(), r["path"]
    lossless = [r["path"] for r in first.labels() if r["format"] in LOSSLESS_FORMATS]

    # Same version/size/seed: nothing is rewritten.
    before = _mtimes(twin)
    messages: list[str] = []
    again = generate_demo_corpus(tmp_path / "twin", size="tiny", seed=0, progress=messages.append)
    assert again == twin and _mtimes(again) == before
    assert "cached" in messages[0]

    # force=True regenerates every file, with the same content.
    forced = generate_demo_corpus(tmp_path / "twin", size="tiny", seed=0, force=True)
    after = _mtimes(forced)
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)
    assert forced.labels() == first.labels()

    # A missing file invalidates the cache.
    os.remove(forced.root / lossless[0])
    healed = generate_demo_corpus(tmp_path / "twin", size="tiny", seed=0)
    assert (healed.root / lossless[0]).read_bytes() == (first.root / lossless[0]).read_bytes()


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(EspeakNotFoundError, match="apt-get install espeak-ng"):
        generate_demo_corpus(tmp_path / "corpus", size="tiny")
    assert not (tmp_path / "corpus").exists()


def _event_features(x: np.ndarray, sr: int) -> np.ndarray:
    """Cheap clip-level descriptors: centroid, flatness, centroid motion, level motion, peakiness, decay."""
    frame = int(0.02 * sr)
    frames = x[: len(x) // frame * frame].reshape(-1, frame) * np.hanning(frame)
    p = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12
    f = np.fft.rfftfreq(frame, 1 / sr)
    e = p.sum(1)
    active = e > 1e-3 * e.max()
    p, e = p[active], e[active]
    centroid = (p * f).sum(1) / e
    flatness = np.exp(np.log(p).mean(1)) / p.mean(1)
    w = e / e.sum()
    spectrum = p.sum(0)
    q = max(1, len(e) // 4)
    return np.array([
        np.log((w * centroid).sum()),
        np.log((w * flatness).sum()),
        np.log(np.std(np.log(centroid)) + 1e-3),
        np.log(np.std(np.log(e)) + 1e-3),
        np.log(np.sort(spectrum)[-len(spectrum) // 50:].sum() / spectrum.sum()),
        np.log(e[:q].mean() / e[-q:].mean()),
    ])


def test_event_classes_are_distinguishable():
    # A nearest-centroid classifier on six cheap descriptors tells the classes apart
    # (chance is 1/10): each class has its own signature, not just random parameters.
    sr, draws = 16000, 16
    rng = np.random.default_rng(0)
    feats = np.array([[_event_features(synth_event(c, rng, sr), sr) for _ in range(draws)] for c in EVENT_CLASSES])
    train, test = feats[:, ::2], feats[:, 1::2]
    mu, sd = train.reshape(-1, feats.shape[-1]).mean(0), train.reshape(-1, feats.shape[-1]).std(0)
    centres = ((train - mu) / sd).mean(1)
    z = (test - mu) / sd
    pred = np.argmin(((z[:, :, None, :] - centres[None, None]) ** 2).sum(-1), axis=-1)
    truth = np.arange(len(EVENT_CLASSES))[:, None]
    assert (pred == truth).mean() >= 0.8
    assert ((pred == truth).mean(1) >= 0.5).all(), dict(zip(EVENT_CLASSES, (pred == truth).mean(1)))
    # Noise is flatter than tonal sounds; impacts decay, steady tones do not.
    i = EVENT_CLASSES.index
    median_flatness = np.median(feats[:, :, 1], axis=1)
    for tonal in ("tone", "harmonic", "am_tone", "fm_tone", "bell"):
        assert median_flatness[i("noise_burst")] > median_flatness[i(tonal)] + 2.0, tonal
    assert feats[i("impact"), :, 5].min() > feats[i("tone"), :, 5].max()


def test_synth_event_rejects_unknown_class():
    with pytest.raises(ValueError, match="unknown event class"):
        synth_event("trumpet", np.random.default_rng(0), 16000)


def _f0_by_harmonic_sum(x: np.ndarray, sr: int, lo: float = 80.0, hi: float = 1000.0) -> float:
    """An independent f0 estimate: the candidate whose first harmonics hold the most spectral energy
    (harmonic summation over a 1/8-semitone grid); finds a missing fundamental too."""
    n = 1 << int(np.ceil(np.log2(len(x)))) + 1
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    cands = lo * 2 ** (np.arange(0, np.log2(hi / lo) * 96) / 96)
    # harmonic sum with decaying weights; subharmonics (f0/2) lose because their odd multiples hold nothing
    scores = [sum(0.9 ** (h - 1) * np.interp(h * f, freqs, mag) for h in range(1, 9) if h * f < 0.45 * sr)
              - sum(0.9 ** (h - 1) * np.interp((h - 0.5) * f, freqs, mag) for h in range(1, 9) if h * f < 0.45 * sr)
              for f in cands]
    return float(cands[int(np.argmax(scores))])


def test_pitched_tones_are_at_their_labelled_pitch(tiny):
    """The pitch label is what an independent pitch estimate (harmonic summation) finds in the file,
    also for tones without their fundamental; timbre is drawn independently of the band."""
    from spear.synthetic.events import PITCH_BANDS, pitch_band_label, synth_pitched

    corpus = tiny[0]
    pitched = [r for r in corpus.labels() if r["kind"] == "pitched"]
    assert len(pitched) == 6 and len({r["pitch_band"] for r in pitched}) == 6
    for r in pitched:
        assert r["pitch_band"] == pitch_band_label(r["pitch_hz"])
        x, sr = sf.read(corpus.root / r["path"], always_2d=True)
        x = x.mean(axis=1)
        a, b = r["event_times"][0]
        est = _f0_by_harmonic_sum(x[int(a * sr): int(b * sr)], sr)
        assert abs(1200 * np.log2(est / r["pitch_hz"])) < 50, (r["path"], est, r["pitch_hz"])
    # missing fundamentals are found too, on clean tones of every band
    rng = np.random.default_rng(3)
    for lo, hi in PITCH_BANDS:
        f0 = float(np.sqrt(lo * hi))
        tone = synth_pitched(f0, rng, 16000, duration=0.5)
        assert abs(1200 * np.log2(_f0_by_harmonic_sum(tone, 16000) / f0)) < 50
