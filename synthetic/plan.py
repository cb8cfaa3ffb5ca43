"""The plan of the demo corpus: what every clip holds, decided up front from the seed.

Every decision that shapes the labels (speaker, text, speed and pitch of each utterance, event
classes and levels, clip length, background, file format, rate and channels, train/test split) is
made here, in one process, from the seed; rendering a clip (:mod:`spear.synthetic.render`) then
depends only on its plan, so a worker pool changes nothing.

Example::

    >>> plans = plan_corpus("tiny", seed=0)
    >>> len(plans), plans[0].kind, plans[0].relpath
    (25, 'word', 'speech/word_0000.wav')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spear.synthetic.events import EVENT_CLASSES, PITCH_BANDS, pitch_band_label
from spear.synthetic.formats import FORMATS, SAMPLE_RATES
from spear.synthetic.speech import SENTENCES, SPEAKERS, WORDS, Speaker


@dataclass
class ClipPlan:
    """One clip of the corpus as planned: everything :func:`spear.synthetic.render.render_clip` needs."""

    index: int
    kind: str  # word | sentence | long_speech | events | mixed | pitched | long_audio
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
    pitch_hz: float | None = None  # pitched clips: the fundamental of the harmonic tone
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
        if self.kind == "pitched":
            return f"pitch:{pitch_band_label(self.pitch_hz)}"
        if self.kind == "mixed":  # mixtures have their own, larger test share: keep them a stratum of their own
            return f"mixed:{self.events[0][0]}"
        return f"event:{self.events[0][0]}"


@dataclass(frozen=True)
class SizeSpec:
    """How many clips of each kind a corpus size has, and their lengths."""

    speakers: int
    words: int
    word_clips: int | None  # None: every word by every speaker
    sentence_clips: int
    event_clips: int
    mixed_clips: int
    pitched_clips: int
    long_speech: int
    long_audio: int
    event_seconds: tuple[float, float]
    long_seconds: tuple[float, float]
    mixed_seconds: tuple[float, float]
    stereo_prob: float
    test_every: tuple[tuple[str, int], ...] = ()  # kinds whose every n-th clip is test (default: every 5th)


#: The corpus sizes: "tiny" for tests, "small" for the test that a student learns what its teachers
#: know (many sound-event test frames), "demo" for `spear demo`.
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(speakers=3, words=6, word_clips=8, sentence_clips=3, event_clips=10, mixed_clips=4,
                      pitched_clips=6, long_speech=0, long_audio=0, event_seconds=(1.0, 2.5),
                      long_seconds=(60, 120), mixed_seconds=(2.0, 4.0), stereo_prob=0.4),  # every 5th test
    # Every other sound-event clip is a test clip: 60 clips, ~660 frame_event test points.
    "small": SizeSpec(speakers=3, words=6, word_clips=12, sentence_clips=4, event_clips=120, mixed_clips=8,
                       pitched_clips=8, long_speech=0, long_audio=0, event_seconds=(1.5, 4.0),
                       long_seconds=(60, 120), mixed_seconds=(1.0, 2.0), stereo_prob=0.35,
                       test_every=(("events", 2),)),
    # Mixtures are many and short: their tasks (mixed_*) need ~350 test clips for a 95 % CI of about
    # +-0.05; half of them are test clips. Half of the 480 sound-event clips too: 240 test clips give the
    # event tasks a CI of about +-0.055 (65 of 320 gave +-0.09-0.10), and the 240 training clips keep
    # pre-training's share of sound events as it was (255).
    "demo": SizeSpec(speakers=len(SPEAKERS), words=len(WORDS), word_clips=None, sentence_clips=100,
                      event_clips=480, mixed_clips=700, pitched_clips=240, long_speech=2, long_audio=2,
                      event_seconds=(1.5, 4.0), long_seconds=(30, 60), mixed_seconds=(1.0, 2.0),
                      stereo_prob=0.35, test_every=(("events", 2), ("mixed", 2), ("pitched", 2))),
}

#: Every n-th clip of a stratum is a test clip: 1 in 5 unless the size says otherwise (the demo: 1 in 2
#: for the sound events, mixtures and pitched tones, whose tasks need many test items for tight intervals; a probe
#: needs far fewer to train).
DEFAULT_TEST_EVERY = 5


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


def plan_corpus(size: str, seed: int) -> list[ClipPlan]:
    """The plans of every clip of a corpus of ``size`` (a key of :data:`SIZES`), in index order."""
    spec = SIZES[size]
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

    plans: list[ClipPlan] = []

    def add(kind: str, **kw: Any) -> ClipPlan:
        p = ClipPlan(index=len(plans), kind=kind, relpath="", fmt="", sample_rate=0, channels=0,
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
        if rng.random() < 0.7:  # mostly single words: short clips keep the 700 mixtures cheap to embed
            w = words[int(rng.integers(len(words)))]
            utt, word = utterance(s, w), w
        else:
            utt, word = utterance(s, SENTENCES[int(rng.integers(len(SENTENCES)))]), None
        p = add("mixed", speaker=s, utterances=[utt], word=word,
                events=random_events((1, 3), EVENT_CLASSES[(i * 3) % len(EVENT_CLASSES)]),
                clip_seconds=float(rng.uniform(*spec.mixed_seconds)), speech_gain_db=float(rng.uniform(-6, 6)))
        if rng.random() < 0.5:
            p.background, p.snr_db = str(rng.choice(["pink", "brown"])), float(rng.uniform(5, 25))
    # Pitched tones: one harmonic complex per clip, its fundamental in one of the pitch bands (cycled so
    # every band is equally common), drawn from the band's middle so no clip sits on a band edge. The
    # timbre (render) varies independently of the pitch, and a clip has background noise, so the band
    # is a matter of pitch, not of the spectral envelope.
    for i in range(spec.pitched_clips):
        lo, hi = PITCH_BANDS[i % len(PITCH_BANDS)]
        width = np.log2(hi / lo)
        f0 = float(lo * 2 ** (width * rng.uniform(0.2, 0.8)))
        add("pitched", events=[("pitched", 0.0)], pitch_hz=f0, clip_seconds=float(rng.uniform(1.0, 2.0)),
            background=str(rng.choice(["pink", "brown"])), snr_db=float(rng.uniform(0, 20)))
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
                  "mixed": "mixed", "pitched": "pitch", "long_audio": "long"}[p.kind]
        p.relpath = f"{p.domain}/{prefix}_{p.index:04d}{FORMATS[p.fmt][2]}"

    # Split: stratified systematic sampling, every n-th file of each stratum (random order) is test.
    test_every = dict(spec.test_every)
    keyed = sorted(plans, key=lambda p: (p.group, float(rng.random())))
    offset = int(rng.integers(DEFAULT_TEST_EVERY))
    for pos, p in enumerate(keyed):
        p.split = "test" if (pos + offset) % test_every.get(p.kind, DEFAULT_TEST_EVERY) == 0 else "train"
    return plans

