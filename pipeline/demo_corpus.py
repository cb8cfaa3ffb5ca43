"""A small labelled corpus of mixed speech and general audio for ``spear demo``.

Speech is synthesised with espeak-ng (several voices and variants, varied speed and
pitch, dozens of words and short sentences); general audio is made of procedural sound
events of ten classes (1 to 5 per clip, some over pink/brown background noise, some mixed
with speech). Files are written in wav, flac, ogg/vorbis, ogg/opus and mp3, at 8, 16,
22.05, 44.1 and 48 kHz, mono and stereo, 1 s to 2 min long: the formats and rates a real
corpus brings, so the decode stage sees them all. Every file's labels go to
``labels.jsonl`` for the probes that evaluate a student later.

Layout under ``root``::

    speech/     speech-only clips (domain "speech")
    audio/      sound-event clips and speech + event mixtures (domain "audio")
    labels.jsonl  one JSON object per file (see :func:`generate_demo_corpus`)
    corpus.json   version, size, seed, counts, total seconds: the cache key

Generation is deterministic given the seed (the same labels, and the same bytes for the
lossless files; the Ogg container draws a random stream serial number, so ogg/opus bytes
differ between runs while their audio does not), and cached: a second call with the same
version, size and seed returns at once.

Example::

    >>> from spear.pipeline.demo_corpus import generate_demo_corpus
    >>> corpus = generate_demo_corpus("/tmp/spear-demo", size="tiny")   # doctest: +SKIP
    >>> corpus.num_files, round(corpus.total_seconds)                  # doctest: +SKIP
    (25, 46)
    >>> corpus.labels()[0]["speaker"]                                  # doctest: +SKIP
    'en'
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import scipy.fft
import soundfile as sf
import soxr

CORPUS_VERSION = 1

SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 22050, 44100, 48000)

# format name -> (libsndfile format, subtype, file extension, allowed sample rates)
FORMATS: dict[str, tuple[str, str, str, tuple[int, ...]]] = {
    "wav": ("WAV", "PCM_16", ".wav", SAMPLE_RATES),
    "flac": ("FLAC", "PCM_16", ".flac", SAMPLE_RATES),
    "ogg": ("OGG", "VORBIS", ".ogg", SAMPLE_RATES),
    # Opus only encodes at 8/12/16/24/48 kHz.
    "opus": ("OGG", "OPUS", ".opus", (8000, 16000, 48000)),
    "mp3": ("MP3", "MPEG_LAYER_III", ".mp3", SAMPLE_RATES),
}
LOSSLESS_FORMATS = ("wav", "flac")

EVENT_CLASSES: tuple[str, ...] = (
    "tone", "chirp", "noise_burst", "impact", "harmonic",
    "am_tone", "fm_tone", "click_train", "siren", "bell",
)

# Event duration range per class, seconds.
_EVENT_DURATIONS: dict[str, tuple[float, float]] = {
    "tone": (0.3, 2.0), "chirp": (0.2, 1.5), "noise_burst": (0.1, 1.0), "impact": (0.15, 0.6),
    "harmonic": (0.4, 2.0), "am_tone": (0.5, 2.0), "fm_tone": (0.5, 2.0), "click_train": (0.3, 1.5),
    "siren": (1.0, 3.0), "bell": (0.5, 2.5),
}

WORDS: tuple[str, ...] = (
    # digits
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    # colours
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple",
    # animals
    "cat", "dog", "bird", "horse", "cow", "fish", "mouse", "sheep",
    # commands
    "yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off",
    # things
    "house", "water", "music", "light", "door", "tree", "car", "book",
)

SENTENCES: tuple[str, ...] = (
    "the red cat is up",
    "go left then stop",
    "seven black birds in a tree",
    "turn the light off",
    "the dog ran down the road",
    "open the door and go right",
    "two green fish and one blue fish",
    "yes the music is on",
    "no the car is not white",
    "the horse and the cow are in the house",
    "put the book on the yellow chair",
    "nine purple mice ran left",
    "stop the music now",
    "the water is cold and blue",
    "three sheep and a dog",
    "go up the tree little bird",
    "eight orange cars went down",
    "the white mouse is on the book",
    "turn right at the green door",
    "zero four six five",
)


@dataclass(frozen=True)
class Speaker:
    """An espeak-ng voice (language + optional variant) with its base speed (wpm) and pitch (0-99)."""

    voice: str
    speed: int
    pitch: int


SPEAKERS: tuple[Speaker, ...] = (
    Speaker("en", 160, 45),
    Speaker("en-us+f2", 165, 70),
    Speaker("en+m3", 145, 30),
    Speaker("en-us", 150, 55),
    Speaker("en+f3", 155, 60),
    Speaker("en-gb-scotland", 140, 40),
    Speaker("en-029", 170, 50),
    Speaker("en-gb-x-rp+f4", 150, 65),
    Speaker("de+m2", 140, 40),
)

_ESPEAK_RATE = 22050


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is not installed (the demo corpus synthesises its speech with it)."""


@dataclass(frozen=True)
class DemoCorpus:
    """A generated demo corpus on local disk (see the module docstring for the layout).

    Example::

        >>> corpus = generate_demo_corpus("/tmp/spear-demo", size="tiny")   # doctest: +SKIP
        >>> [(r["path"], r["word"]) for r in corpus.labels() if r["domain"] == "speech"][:1]  # doctest: +SKIP
        [('speech/word_0000.wav', 'zero')]
    """

    root: Path
    speech_dir: Path
    audio_dir: Path
    labels_path: Path
    num_files: int
    total_seconds: float

    def labels(self) -> list[dict[str, Any]]:
        """One dict per file, in generation order; ``path`` is relative to ``root``."""
        with open(self.labels_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    @classmethod
    def load(cls, root: str | Path) -> "DemoCorpus":
        """The corpus already generated under ``root`` (reads ``corpus.json``)."""
        root = Path(root)
        meta = json.loads((root / "corpus.json").read_text(encoding="utf-8"))
        return cls._from_meta(root, meta)

    @classmethod
    def _from_meta(cls, root: Path, meta: dict[str, Any]) -> "DemoCorpus":
        return cls(root=root, speech_dir=root / "speech", audio_dir=root / "audio",
                   labels_path=root / "labels.jsonl", num_files=int(meta["num_files"]),
                   total_seconds=float(meta["total_seconds"]))


# ----------------------------------------------------------------------------------------
# Procedural sound events


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _fade(x: np.ndarray, sr: int, attack_s: float, release_s: float) -> np.ndarray:
    n = len(x)
    a = min(n // 2, max(1, int(attack_s * sr)))
    r = min(n // 2, max(1, int(release_s * sr)))
    shape = (-1,) + (1,) * (x.ndim - 1)  # (frames,) or (frames, channels)
    x[:a] *= np.linspace(0.0, 1.0, a, endpoint=False).reshape(shape)
    x[n - r:] *= np.linspace(1.0, 0.0, r).reshape(shape)
    return x


def _band_noise(rng: np.random.Generator, n: int, sr: int, centre: float, octaves: float) -> np.ndarray:
    """White noise shaped by a Gaussian band on a log-frequency axis (centre in Hz, width in octaves)."""
    m = scipy.fft.next_fast_len(n, real=True)  # an FFT of a prime length is slow
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1.0 / sr)
    dist = np.log2(np.maximum(f, 1.0) / centre) / (octaves / 2)
    spec *= np.exp(-0.5 * dist**2)
    return np.fft.irfft(spec, m)[:n]


def _coloured_noise(rng: np.random.Generator, n: int, sr: int, colour: str) -> np.ndarray:
    """Pink (1/f power) or brown (1/f^2 power) noise, high-passed at 20 Hz, unit RMS."""
    m = scipy.fft.next_fast_len(n, real=True)
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1.0 / sr)
    exponent = 0.5 if colour == "pink" else 1.0
    spec *= np.where(f >= 20.0, 1.0 / np.maximum(f, 20.0) ** exponent, 0.0)
    x = np.fft.irfft(spec, m)[:n]
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _momentary_rms(x: np.ndarray, sr: int, window_s: float = 0.05) -> float:
    """Max RMS over 50 ms windows: a level that ranks a short impact and a long tone fairly."""
    w = max(1, int(window_s * sr))
    n = (len(x) + w - 1) // w * w
    frames = np.pad(x, (0, n - len(x))).reshape(-1, w)
    return float(np.sqrt(np.mean(frames**2, axis=1).max()))


def synth_event(name: str, rng: np.random.Generator, sample_rate: int,
                duration: float | None = None) -> np.ndarray:
    """One procedural sound event of class ``name`` (see :data:`EVENT_CLASSES`), mono float64,
    scaled to a momentary (50 ms) RMS of 1. Parameters are drawn from ``rng`` within the class;
    ``duration`` defaults to a draw from the class's own range.

    Example::

        >>> import numpy as np
        >>> x = synth_event("bell", np.random.default_rng(0), 16000, duration=1.0)
        >>> x.shape
        (16000,)
    """
    if name not in _EVENT_DURATIONS:
        raise ValueError(f"unknown event class {name!r}; known: {', '.join(EVENT_CLASSES)}")
    sr = sample_rate
    if duration is None:
        duration = rng.uniform(*_EVENT_DURATIONS[name])
    n = max(int(round(duration * sr)), int(0.05 * sr))
    t = np.arange(n) / sr
    nyq = 0.45 * sr  # keep every partial clear of the Nyquist frequency (8 kHz files too)

    if name == "tone":
        f = min(_loguniform(rng, 200, 2000), nyq)
        x = _fade(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)), sr, 0.01, 0.02)
    elif name == "chirp":
        f0, f1 = _loguniform(rng, 150, 600), min(_loguniform(rng, 1500, 6000), nyq)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        d = n / sr
        k = np.log(f1 / f0)
        phase = 2 * np.pi * f0 * d / k * (np.exp(k * t / d) - 1.0)
        x = _fade(np.sin(phase), sr, 0.01, 0.01)
    elif name == "noise_burst":
        centre = min(_loguniform(rng, 400, 6000), 0.6 * nyq)
        x = _fade(_band_noise(rng, n, sr, centre, rng.uniform(0.5, 2.0)), sr, 0.005, 0.01)
    elif name == "impact":
        tau = rng.uniform(0.01, 0.05)
        click = rng.standard_normal(n) * np.exp(-t / tau)
        f_thud = _loguniform(rng, 50, 150)
        thud = np.sin(2 * np.pi * f_thud * t) * np.exp(-t / rng.uniform(0.05, 0.2))
        x = click + rng.uniform(1.0, 4.0) * thud
        x = _fade(x, sr, 0.0005, 0.01)
    elif name == "harmonic":
        f0 = _loguniform(rng, 100, 400)
        x = np.zeros(n)
        slope = rng.uniform(0.5, 1.5)
        for h in range(1, int(rng.integers(5, 13)) + 1):
            if h * f0 >= nyq:
                break
            x += h ** -slope * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
        x = _fade(x, sr, 0.02, 0.05)
    elif name == "am_tone":
        fc = min(_loguniform(rng, 300, 3000), nyq)
        rate, depth = rng.uniform(4, 20), rng.uniform(0.7, 1.0)
        env = 1.0 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
        x = _fade(env * np.sin(2 * np.pi * fc * t), sr, 0.01, 0.02)
    elif name == "fm_tone":
        fc = _loguniform(rng, 400, 2000)
        fm, dev = rng.uniform(4, 12), rng.uniform(0.08, 0.25) * fc
        phase = 2 * np.pi * fc * t + dev / fm * np.sin(2 * np.pi * fm * t)
        x = _fade(np.sin(phase), sr, 0.01, 0.02)
    elif name == "click_train":
        rate = rng.uniform(5, 40)
        impulses = np.zeros(n)
        pos = np.arange(0.0, n / sr, 1.0 / rate) + rng.uniform(0, 0.2 / rate)
        pos = pos + rng.normal(0, 0.05 / rate, len(pos))
        idx = np.clip((pos * sr).astype(int), 0, n - 1)
        impulses[idx] = rng.choice([-1.0, 1.0], len(idx)) * rng.uniform(0.7, 1.0, len(idx))
        klen = max(8, int(0.004 * sr))
        kernel = rng.standard_normal(klen) * np.exp(-np.arange(klen) / (0.25 * klen))
        x = np.convolve(impulses, kernel)[:n]
    elif name == "siren":
        centre = _loguniform(rng, 600, 1200)
        dev, rate = rng.uniform(0.3, 0.5) * centre, rng.uniform(0.3, 1.5)
        phase0 = rng.uniform(0, 2 * np.pi)
        inst_f = centre + dev * np.sin(2 * np.pi * rate * t + phase0)
        phase = 2 * np.pi * np.cumsum(inst_f) / sr
        x = np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)
        x = _fade(x, sr, 0.05, 0.1)
    elif name == "bell":
        f0 = _loguniform(rng, 300, 1500)
        tau = rng.uniform(0.2, 0.8)
        x = np.zeros(n)
        for ratio, amp in ((1.0, 1.0), (2.0, 0.6), (2.76, 0.5), (5.40, 0.3), (8.93, 0.2)):
            f = f0 * ratio * (1.0 + rng.normal(0, 0.01))
            if f >= nyq:
                continue
            x += amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t * np.sqrt(ratio) / tau)
        x = _fade(x, sr, 0.001, 0.02)
    return x / (_momentary_rms(x, sr) + 1e-12)


# ----------------------------------------------------------------------------------------
# Speech


def _espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakNotFoundError(
            "espeak-ng was not found on PATH: the demo corpus synthesises its speech with it. "
            "Install it with `apt-get install espeak-ng` (Debian/Ubuntu) or your system's package manager.")
    return exe


def synth_speech(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of ``text`` (22.05 kHz mono float64), leading/trailing silence trimmed."""
    proc = subprocess.run([_espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    x, sr = sf.read(io.BytesIO(proc.stdout), dtype="float64", always_2d=False)
    if sr != _ESPEAK_RATE:
        x = soxr.resample(x, sr, _ESPEAK_RATE)
    loud = np.flatnonzero(np.abs(x) > 0.01 * np.abs(x).max())
    margin = int(0.02 * _ESPEAK_RATE)
    return x[max(0, loud[0] - margin): loud[-1] + margin] if len(loud) else x


# ----------------------------------------------------------------------------------------
# Planning: every decision that shapes the labels is made here, in one process, from the
# seed; rendering a clip then depends only on its plan (so a worker pool changes nothing).


@dataclass
class _Plan:
    index: int
    kind: str  # word | sentence | long_speech | events | mixed | long_audio
    relpath: str
    fmt: str
    sample_rate: int
    channels: int
    seed: int
    speaker: Speaker | None = None
    utterances: list[tuple[str, int, int]] = field(default_factory=list)  # (text, speed, pitch)
    word: str | None = None
    events: list[tuple[str, float]] = field(default_factory=list)  # (class, level dB rel. primary)
    clip_seconds: float = 0.0  # target length for event clips (speech clips follow their speech)
    background: str | None = None
    snr_db: float | None = None
    speech_gain_db: float = 0.0
    split: str = "train"

    @property
    def domain(self) -> str:
        return "speech" if self.kind in ("word", "sentence", "long_speech") else "audio"

    @property
    def group(self) -> str:
        """The stratum the train/test split balances over."""
        if self.kind == "word":
            return f"word:{self.word}"
        if self.kind in ("sentence", "long_speech"):
            return f"speaker:{self.speaker.voice}"
        return f"event:{self.events[0][0]}"


@dataclass(frozen=True)
class _SizeSpec:
    speakers: int
    words: int
    word_clips: int | None  # None: every word by every speaker
    sentence_clips: int
    event_clips: int
    mixed_clips: int
    long_speech: int
    long_audio: int
    event_seconds: tuple[float, float]
    long_seconds: tuple[float, float]
    stereo_prob: float


_SIZES: dict[str, _SizeSpec] = {
    "tiny": _SizeSpec(speakers=3, words=6, word_clips=8, sentence_clips=3, event_clips=10, mixed_clips=4,
                      long_speech=0, long_audio=0, event_seconds=(1.0, 2.5), long_seconds=(60, 120),
                      stereo_prob=0.4),
    "demo": _SizeSpec(speakers=len(SPEAKERS), words=len(WORDS), word_clips=None, sentence_clips=100,
                      event_clips=320, mixed_clips=60, long_speech=2, long_audio=2,
                      event_seconds=(1.5, 4.0), long_seconds=(60, 120), stereo_prob=0.35),
}


def _coverage_combos(rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """(format, rate, channels) combos covering every format in mono and stereo and every sample rate."""
    combos: list[tuple[str, int, int]] = []
    rates_left = list(SAMPLE_RATES)
    for fmt, (_, _, _, rates) in FORMATS.items():
        for ch in (1, 2):
            wanted = [r for r in rates_left if r in rates]
            rate = wanted[0] if wanted else int(rng.choice(rates))
            if rate in rates_left:
                rates_left.remove(rate)
            combos.append((fmt, rate, ch))
    assert not rates_left, rates_left
    return combos


def _plan_corpus(size: str, seed: int) -> list[_Plan]:
    spec = _SIZES[size]
    rng = np.random.default_rng([seed, 0])
    speakers = SPEAKERS[: spec.speakers]
    words = WORDS[: spec.words]

    def utterance(spk: Speaker, text: str) -> tuple[str, int, int]:
        speed = int(np.clip(spk.speed + rng.integers(-20, 21), 80, 450))
        pitch = int(np.clip(spk.pitch + rng.integers(-8, 9), 0, 99))
        return (text, speed, pitch)

    def random_events(count_range: tuple[int, int], primary: str | None = None) -> list[tuple[str, float]]:
        count = int(rng.integers(count_range[0], count_range[1] + 1))
        first = primary if primary is not None else str(rng.choice(EVENT_CLASSES))
        # The primary event is the loudest by construction: the others sit 3-12 dB below it.
        return [(first, 0.0)] + [(str(rng.choice(EVENT_CLASSES)), float(rng.uniform(-12, -3)))
                                 for _ in range(count - 1)]

    plans: list[_Plan] = []

    def add(kind: str, **kw: Any) -> _Plan:
        p = _Plan(index=len(plans), kind=kind, relpath="", fmt="", sample_rate=0, channels=0,
                  seed=int(rng.integers(0, 2**31)), **kw)
        plans.append(p)
        return p

    # Speech: single words (each word across several voices), then short sentences.
    if spec.word_clips is None:
        pairs = [(w, s) for w in words for s in speakers]
    else:
        pairs = [(words[i % len(words)], speakers[(i + i // len(words)) % len(speakers)])
                 for i in range(spec.word_clips)]
    for w, s in pairs:
        add("word", speaker=s, utterances=[utterance(s, w)], word=w)
    for i in range(spec.sentence_clips):
        s = speakers[i % len(speakers)]
        add("sentence", speaker=s, utterances=[utterance(s, SENTENCES[int(rng.integers(len(SENTENCES)))])])
    for i in range(spec.long_speech):
        s = speakers[i % len(speakers)]
        target = rng.uniform(*spec.long_seconds)
        # A sentence per 1.5 s of target is more text than needed (each takes ~2-3 s with its pause);
        # the renderer stops once the target is reached.
        texts = [SENTENCES[int(j)] for j in rng.integers(len(SENTENCES), size=int(target / 1.5) + 4)]
        add("long_speech", speaker=s, utterances=[utterance(s, t) for t in texts], clip_seconds=target)

    # General audio: the primary class cycles so every class is (nearly) equally primary.
    for i in range(spec.event_clips):
        p = add("events", events=random_events((1, 5), EVENT_CLASSES[i % len(EVENT_CLASSES)]),
                clip_seconds=float(rng.uniform(*spec.event_seconds)))
        if rng.random() < 0.5:
            p.background, p.snr_db = str(rng.choice(["pink", "brown"])), float(rng.uniform(5, 25))
    for i in range(spec.mixed_clips):
        s = speakers[int(rng.integers(len(speakers)))]
        if rng.random() < 0.5:
            w = words[int(rng.integers(len(words)))]
            utt, word = utterance(s, w), w
        else:
            utt, word = utterance(s, SENTENCES[int(rng.integers(len(SENTENCES)))]), None
        p = add("mixed", speaker=s, utterances=[utt], word=word,
                events=random_events((1, 3), EVENT_CLASSES[(i * 3) % len(EVENT_CLASSES)]),
                clip_seconds=float(rng.uniform(2.0, 5.0)), speech_gain_db=float(rng.uniform(-6, 6)))
        if rng.random() < 0.5:
            p.background, p.snr_db = str(rng.choice(["pink", "brown"])), float(rng.uniform(5, 25))
    for i in range(spec.long_audio):
        add("long_audio", events=random_events((3, 5)), clip_seconds=float(rng.uniform(*spec.long_seconds)),
            background=str(rng.choice(["pink", "brown"])), snr_db=float(rng.uniform(10, 25)))

    # Formats: the coverage combos first, the rest at random; then shuffled over all files.
    assign = _coverage_combos(rng)
    fmts = list(FORMATS)
    while len(assign) < len(plans):
        fmt = fmts[int(rng.integers(len(fmts)))]
        rates = FORMATS[fmt][3]
        assign.append((fmt, int(rates[int(rng.integers(len(rates)))]), 2 if rng.random() < spec.stereo_prob else 1))
    order = rng.permutation(len(assign))
    for p, k in zip(plans, order):
        p.fmt, p.sample_rate, p.channels = assign[int(k)]
        prefix = {"word": "word", "sentence": "sent", "long_speech": "long", "events": "events",
                  "mixed": "mixed", "long_audio": "long"}[p.kind]
        p.relpath = f"{p.domain}/{prefix}_{p.index:04d}{FORMATS[p.fmt][2]}"

    # Split: stratified systematic sampling, every 5th file of each stratum (random order) is test.
    keyed = sorted(plans, key=lambda p: (p.group, float(rng.random())))
    offset = int(rng.integers(5))
    for pos, p in enumerate(keyed):
        p.split = "test" if (pos + offset) % 5 == 0 else "train"
    return plans


# ----------------------------------------------------------------------------------------
# Rendering one clip


def _pan_gains(rng: np.random.Generator, channels: int) -> np.ndarray:
    if channels == 1:
        return np.ones(1)
    angle = (rng.uniform(-0.6, 0.6) + 1.0) * np.pi / 4  # constant-power pan
    return np.array([np.cos(angle), np.sin(angle)]) * np.sqrt(2.0)


def _write_audio(path: Path, x: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Write (frames, channels) float audio in ~1 s chunks (libsndfile's Vorbis encoder
    crashes on one long write)."""
    major, subtype, _, _ = FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=x.shape[1], format=major, subtype=subtype) as f:
        for start in range(0, len(x), sample_rate):
            f.write(x[start:start + sample_rate])


def _render(plan: _Plan, root: str) -> dict[str, Any]:
    rng = np.random.default_rng([plan.seed, plan.index, 1])
    sr, ch = plan.sample_rate, plan.channels

    # Speech (already planned: voice, text, speed, pitch), resampled to the file's rate.
    speech_parts: list[np.ndarray] = []
    texts: list[str] = []
    spoken = 0.0
    for text, speed, pitch in plan.utterances:
        if plan.kind == "long_speech" and spoken >= plan.clip_seconds:
            break
        y = synth_speech(text, plan.speaker.voice, speed, pitch)
        if sr != _ESPEAK_RATE:
            y = soxr.resample(y, _ESPEAK_RATE, sr)
        speech_parts.append(y)
        texts.append(text)
        spoken += len(y) / sr + 0.8

    # Utterance offsets (samples) inside the speech track: one per text.
    offsets: list[tuple[int, int]] = []
    if plan.kind == "long_speech":
        pieces, pos = [], 0
        for y in speech_parts:
            offsets.append((pos, pos + len(y)))
            pause = np.zeros(int(rng.uniform(0.3, 1.5) * sr))
            pieces += [y, pause]
            pos += len(y) + len(pause)
        speech = np.concatenate(pieces[:-1])
    else:
        speech = speech_parts[0] if speech_parts else None
        offsets = [(0, len(speech))] if speech is not None else []
    if speech is not None:
        speech = speech / (_momentary_rms(speech, sr) + 1e-12)

    # Clip length: speech clips follow their speech (at least 1 s), event clips their plan.
    if plan.kind in ("word", "sentence"):
        n = max(int(1.0 * sr), len(speech) + int(rng.uniform(0.2, 0.8) * sr))
    elif plan.kind == "long_speech":
        n = len(speech) + int(0.5 * sr)
    elif plan.kind == "mixed":
        n = max(int(plan.clip_seconds * sr), len(speech) + int(0.4 * sr))
    else:
        n = int(plan.clip_seconds * sr)
    mix = np.zeros((n, ch))

    speech_span, speech_segments = None, []
    if speech is not None:
        start = int(rng.integers(0, n - len(speech) + 1))
        mix[start:start + len(speech)] += (10 ** (plan.speech_gain_db / 20) * speech)[:, None] * _pan_gains(rng, ch)
        speech_span = [round(start / sr, 3), round((start + len(speech)) / sr, 3)]
        speech_segments = [[round((start + a) / sr, 3), round((start + b) / sr, 3), text]
                           for (a, b), text in zip(offsets, texts)]

    event_rows = []
    for cls, level_db in plan.events:
        dur = min(rng.uniform(*_EVENT_DURATIONS[cls]), n / sr - 0.1)
        e = synth_event(cls, rng, sr, duration=dur) * 10 ** (level_db / 20)
        start = int(rng.integers(0, n - len(e) + 1))
        mix[start:start + len(e)] += e[:, None] * _pan_gains(rng, ch)
        event_rows.append((start / sr, (start + len(e)) / sr, cls))
    event_rows.sort()

    if plan.background is not None:
        # Level relative to the primary event (momentary RMS 1); stereo gets decorrelated channels.
        noise = np.stack([_coloured_noise(rng, n, sr, plan.background) for _ in range(ch)], axis=1)
        mix += noise * 10 ** (-plan.snr_db / 20)

    # Peak well below full scale: lossy decoders overshoot a little.
    mix = _fade(mix, sr, 0.01, 0.01)
    mix *= rng.uniform(0.25, 0.7) / (np.abs(mix).max() + 1e-12)
    _write_audio(Path(root) / plan.relpath, mix.astype(np.float32), sr, plan.fmt)

    speaker = plan.speaker.voice if plan.speaker is not None else None
    return {
        "path": plan.relpath,
        "domain": plan.domain,
        "kind": plan.kind,
        "format": plan.fmt,
        "sample_rate": sr,
        "channels": ch,
        "duration": round(n / sr, 6),
        "split": plan.split,
        "speaker": speaker,
        "word": plan.word,
        "text": " ".join(texts) if texts else None,
        "speech_span": speech_span,
        "speech_segments": speech_segments,
        "has_speech": speech is not None,
        "events": [cls for _, _, cls in event_rows],
        "event_times": [[round(a, 3), round(b, 3)] for a, b, _ in event_rows],
        "event_count": len(event_rows),
        "primary_event": plan.events[0][0] if plan.events else None,
        "background": plan.background,
        "snr_db": None if plan.snr_db is None else round(plan.snr_db, 2),
    }


def _render_indexed(args: tuple[_Plan, str]) -> tuple[int, dict[str, Any]]:
    return args[0].index, _render(*args)


# ----------------------------------------------------------------------------------------
# Public entry point


def _cached(root: Path, size: str, seed: int) -> DemoCorpus | None:
    meta_path, labels_path = root / "corpus.json", root / "labels.jsonl"
    if not (meta_path.is_file() and labels_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (meta.get("version"), meta.get("size"), meta.get("seed")) != (CORPUS_VERSION, size, seed):
        return None
    try:
        corpus = DemoCorpus._from_meta(root, meta)
        rows = corpus.labels()
        complete = len(rows) == corpus.num_files and all((root / r["path"]).is_file() for r in rows)
    except (OSError, ValueError, KeyError, TypeError):  # a half-written or foreign corpus: regenerate
        return None
    return corpus if complete else None


def _remove_previous(root: Path) -> None:
    """Delete the files a previous generation listed (only those: root may hold other things)."""
    (root / "corpus.json").unlink(missing_ok=True)
    labels_path = root / "labels.jsonl"
    if labels_path.is_file():
        for line in labels_path.read_text(encoding="utf-8").splitlines():
            try:
                rel = json.loads(line)["path"]
            except (ValueError, KeyError, TypeError):
                continue
            if rel.split("/", 1)[0] in ("speech", "audio"):
                (root / rel).unlink(missing_ok=True)
        labels_path.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate_demo_corpus(root: str | Path, *, size: Literal["tiny", "demo"] = "demo", seed: int = 0,
                         force: bool = False, progress: Callable[[str], None] | None = None,
                         workers: int | None = None) -> DemoCorpus:
    """Generate (once; cached) the labelled demo corpus under the local directory ``root``.

    ``size="tiny"`` (tests): 25 files, under a minute of audio, every format, sample rate
    and channel count. ``size="demo"`` (``spear demo``): ~880 files, ~35 minutes: every one
    of 44 words by each of 9 voices, 100 sentences, 320 event clips, 60 speech + event
    mixtures, and 4 files of 1-2 minutes.

    Each line of ``labels.jsonl`` holds: ``path`` (relative to root), ``domain``
    ("speech" | "audio"), ``kind`` (word | sentence | long_speech | events | mixed |
    long_audio), ``format`` (wav | flac | ogg | opus | mp3), ``sample_rate``, ``channels``,
    ``duration`` (s), ``split`` ("train" | "test", stratified by word / speaker / primary
    event), ``speaker`` (espeak-ng voice id or null), ``word`` (single-word utterances, else
    null), ``text``, ``speech_span`` ([start, end] s of the speech), ``speech_segments``
    ([start, end, text] per utterance; several in a long speech file), ``has_speech``,
    ``events`` (class names in onset order), ``event_times`` ([start, end] s each),
    ``event_count``, ``primary_event`` (the loudest event: the others are 3-12 dB below it),
    ``background`` ("pink" | "brown" | null) and ``snr_db`` (background relative to the
    primary event). Speech clips have ``events == []`` and ``event_count == 0``.

    If ``root/corpus.json`` records the same version, size and seed and every listed file
    exists, nothing is written and the cached corpus is returned (unless ``force``).
    ``workers`` processes render the clips (default: 1 for tiny, up to 2 for demo); the
    result does not depend on it. ``progress`` receives a short line now and then.

    Example::

        >>> corpus = generate_demo_corpus("/tmp/spear-demo", size="tiny", progress=print)  # doctest: +SKIP
        demo corpus (tiny): generating 25 files under /tmp/spear-demo
        ...
    """
    if size not in _SIZES:
        raise ValueError(f"size must be one of {sorted(_SIZES)}, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    root = Path(root)
    say = progress or (lambda _msg: None)

    if not force:
        cached = _cached(root, size, seed)
        if cached is not None:
            say(f"demo corpus ({size}): cached, {cached.num_files} files, "
                f"{cached.total_seconds / 60:.1f} min under {root}")
            return cached

    _espeak_binary()  # fail before touching anything
    root.mkdir(parents=True, exist_ok=True)
    _remove_previous(root)
    plans = _plan_corpus(size, seed)
    say(f"demo corpus ({size}): generating {len(plans)} files under {root}")
    t0 = time.perf_counter()

    if workers is None:
        workers = 1 if size == "tiny" else max(1, min(2, os.cpu_count() or 1))
    rows: list[dict[str, Any] | None] = [None] * len(plans)
    step = max(1, len(plans) // 10)
    # The long clips go first so the pool finishes evenly.
    jobs = [(p, str(root)) for p in sorted(plans, key=lambda p: -p.clip_seconds if "long" in p.kind else 0)]
    done = 0

    def collect(row: dict[str, Any], plan_index: int) -> None:
        nonlocal done
        rows[plan_index] = row
        done += 1
        if done % step == 0 or done == len(plans):
            say(f"demo corpus ({size}): generated {done}/{len(plans)} files")

    if workers <= 1:
        for job in jobs:
            collect(_render(*job), job[0].index)
    else:
        # spawn, not fork: the caller may already run threads (Ray) that fork would copy mid-flight.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for index, row in pool.imap_unordered(_render_indexed, jobs, chunksize=4):
                collect(row, index)

    assert all(r is not None for r in rows)
    total = float(sum(r["duration"] for r in rows))
    _write_text_atomic(root / "labels.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def count(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rows:
            out[str(r[key])] = out.get(str(r[key]), 0) + 1
        return dict(sorted(out.items()))

    meta = {
        "version": CORPUS_VERSION, "size": size, "seed": seed, "num_files": len(rows),
        "total_seconds": round(total, 3),
        "counts": {"domain": count("domain"), "kind": count("kind"), "format": count("format"),
                   "sample_rate": count("sample_rate"), "channels": count("channels"), "split": count("split"),
                   "primary_event": count("primary_event")},
        "event_classes": list(EVENT_CLASSES),
        "speakers": [s.voice for s in SPEAKERS[: _SIZES[size].speakers]],
        "words": list(WORDS[: _SIZES[size].words]),
    }
    _write_text_atomic(root / "corpus.json", json.dumps(meta, indent=2) + "\n")
    say(f"demo corpus ({size}): {len(rows)} files, {total / 60:.1f} min of audio "
        f"in {time.perf_counter() - t0:.1f} s")
    return DemoCorpus._from_meta(root, meta)
