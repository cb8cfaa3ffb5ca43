"""A small Lhotse corpus written by Lhotse itself over real audio files (libsndfile-encoded).

Recordings: ``long_a.flac`` (16 kHz mono, 9 s) and ``long_b.wav`` (22.05 kHz mono, 8 s) cut into several
cuts each, ``stereo.flac`` (16 kHz, 2 channels) with one channel chosen and one cut over both, and
``gone.wav`` (written, described by Lhotse, then deleted: a missing recording). Bad cuts beside the good
ones: a cut starting past its recording's end, one longer than ``decode.max_segment_seconds=4``, a
duplicate id and a MixedCut.

Example::

    corpus = make_lhotse_corpus(tmp_path)
    corpus.manifest1        # cuts.jsonl.gz: GOOD_1 plus the bad cuts
    corpus.manifest2        # more.jsonl.gz: everything of manifest1 and ADDED
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from support.audio_files import tones

# good cuts of the first manifest: id -> (recording, start, duration, channel)
GOOD_1 = {"a-0": ("long_a", 0.0, 3.0, 0), "a-1": ("long_a", 3.0, 3.0, 0), "b-0": ("long_b", 0.0, 3.5, 0),
          "st-1": ("stereo", 0.5, 3.0, 1), "st-mix": ("stereo", 0.0, 2.0, [0, 1])}
ADDED = {"a-2": ("long_a", 6.0, 3.0, 0), "b-1": ("long_b", 3.5, 3.5, 0)}
# decode-stage quarantines (recorded in the ledger): id -> words of the reason
DECODE_BAD = {"gone": "recording audio missing", "past": "offset past the end", "long": "longer than decode.max_segment_seconds"}
# listing quarantines: reason words
CATALOG_BAD = {"duplicate cut id": "a-0", "unsupported cut type MixedCut": None}
SPEAKERS = {"a-0": "spk1", "st-1": "spk2"}
TEXTS = {"a-0": "hello world", "a-1": "second part"}


def _signal(rate: int, channels: int, seconds: float, seed: int) -> np.ndarray:
    """Tones under a slow envelope plus a little noise: frames that differ, so tiny codebooks fit."""
    t = np.arange(int(round(rate * seconds))) / rate
    rng = np.random.default_rng(seed)
    env = 0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t)
    return np.stack([tones(t, c) * env + 0.02 * rng.standard_normal(t.size) for c in range(channels)],
                    axis=1).astype(np.float32)


@dataclass
class LhotseCorpus:
    root: Path
    audio: Path
    manifest1: Path
    manifest2: Path
    recordings: dict


def _cut(recs, cid, rec, start, duration, channel, *, supervisions=()):
    from lhotse import MonoCut, MultiCut, SupervisionSegment

    sups = [SupervisionSegment(id=f"{cid}-s{i}", recording_id=recs[rec].id, start=start, duration=duration,
                               channel=channel, speaker=spk, language=lang, text=text)
            for i, (spk, lang, text) in enumerate(supervisions)]
    cls = MultiCut if isinstance(channel, list) else MonoCut
    return cls(id=cid, start=start, duration=duration, channel=channel, recording=recs[rec], supervisions=sups)


def good_cut(recs, cid, spec):
    rec, start, duration, channel = spec
    sups = []
    if cid in TEXTS or cid in SPEAKERS:
        words = TEXTS.get(cid, "").split()
        if cid == "a-1":  # two supervisions: their texts are joined
            sups = [(None, "en", words[0]), (None, "en", words[1])]
        else:
            sups = [(SPEAKERS.get(cid), "en", TEXTS.get(cid))]
    return _cut(recs, cid, rec, start, duration, channel, supervisions=sups)


def make_lhotse_corpus(root: Path) -> LhotseCorpus:
    from lhotse import CutSet, Recording

    root = Path(root)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    sf.write(audio / "long_a.flac", _signal(16000, 1, 9.0, 1), 16000, subtype="PCM_16")
    sf.write(audio / "long_b.wav", _signal(22050, 1, 8.0, 2), 22050, subtype="PCM_16")
    sf.write(audio / "stereo.flac", _signal(16000, 2, 4.0, 3), 16000, subtype="PCM_16")
    sf.write(audio / "gone.wav", _signal(16000, 1, 2.0, 4), 16000, subtype="PCM_16")
    recs = {name: Recording.from_file(audio / f"{name}.{ext}", recording_id=name)
            for name, ext in (("long_a", "flac"), ("long_b", "wav"), ("stereo", "flac"), ("gone", "wav"))}
    os.remove(audio / "gone.wav")
    good = [good_cut(recs, cid, spec) for cid, spec in GOOD_1.items()]
    bad = [_cut(recs, "gone", "gone", 0.0, 1.5, 0), _cut(recs, "past", "long_a", 20.0, 2.0, 0),
           _cut(recs, "long", "long_a", 0.0, 5.0, 0), _cut(recs, "a-0", "long_a", 1.0, 1.0, 0),
           good[0].append(good[1]).with_id("mixed")]
    added = [good_cut(recs, cid, spec) for cid, spec in ADDED.items()]
    m1, m2 = root / "cuts.jsonl.gz", root / "more.jsonl.gz"
    CutSet.from_cuts(good + bad).to_file(m1)
    CutSet.from_cuts(good + bad + added).to_file(m2)
    return LhotseCorpus(root=root, audio=audio, manifest1=m1, manifest2=m2, recordings=recs)


def write_shar(corpus: LhotseCorpus, out: Path, ids=tuple(GOOD_1)) -> Path:
    """The good cuts as a Lhotse Shar directory (FLAC audio, 2 cuts per shard), written by Lhotse."""
    from lhotse import CutSet

    first: dict = {}
    for c in CutSet.from_file(corpus.manifest1):
        if c.id in ids:
            first.setdefault(c.id, c)  # the first of the duplicate ids
    cuts = CutSet.from_cuts(first.values())
    os.makedirs(out, exist_ok=True)
    cuts.to_shar(out, fields={"recording": "flac"}, shard_size=2)
    return Path(out)
