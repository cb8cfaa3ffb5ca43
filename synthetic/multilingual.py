"""A multilingual, multi-speaker speech corpus for post-training (`spear demo --posttrain`), spoken by espeak-ng.

Parallel sentences (:mod:`~spear.synthetic.multilingual_sentences`: everyday sentences in English, German,
French and Spanish; the English one is the *pivot*) are spoken by synthetic speakers. A speaker is one
espeak-ng voice variant (``-v <lang>+<variant>``) with a fixed pitch (``-p``) and rate (``-s``), drawn from
the seed, and speaks every language. What the corpus holds:

- **train** (``train.jsonl``): the train speakers say the train sentences, each (sentence, language) pair by
  several speakers, each speaker in every language;
- **eval** (``eval.jsonl``): held-out speakers (none of them in train) say the eval sentences, each in
  several languages, so that a sentence has parallel utterances across languages and speakers. Eval
  sentences are some train sentences (``seen_sentence: true``) and sentences held out of training
  altogether (``seen_sentence: false``): retrieval can be reported for both.

Each manifest line (JSONL, read by :mod:`spear.stages.posttrain_data`): ``id``, ``audio`` (relative to the
corpus root), ``speaker``, ``language``, ``text``, ``pivot`` (the English sentence), ``sentence`` (its id,
shared by the translations), ``seen_sentence``. Audio is 16 kHz mono FLAC under ``audio/<speaker>/``.
``corpus.json`` (version, size, seed, speakers and their voices, sentences, counts, seconds) is the cache
key: a second call with the same size and seed returns at once. Generation is deterministic given the seed
(the same bytes), with espeak-ng run from a thread pool.

Sizes: ``demo`` (40 speakers: 24 train, 16 eval; 42 sentences: 36 train, 6 unseen; 576 train and 672 eval
utterances, about 31 minutes of audio) and ``tiny`` (tests: 5 speakers, 8 sentences, 40 utterances).

Example::

    >>> corpus = generate_multilingual_corpus("/tmp/spear-ml", size="tiny")       # doctest: +SKIP
    >>> corpus.train_manifest.name, corpus.utterances                            # doctest: +SKIP
    ('train.jsonl', {'train': 24, 'eval': 16})
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import soundfile as sf
import soxr

from spear.cluster.storage import Storage
from spear.synthetic.multilingual_sentences import LANGUAGES, SENTENCES
from spear.synthetic.speech import ESPEAK_RATE, espeak_binary, synth_speech

#: Bumped when the same size and seed would give another corpus: a cached one is then regenerated.
MULTILINGUAL_VERSION = 2   # 2: 16 held-out speakers in the demo size (was 8)

SAMPLE_RATE = 16000

#: espeak-ng voice per language code of :data:`LANGUAGES`.
ESPEAK_VOICES = {"en": "en-us", "de": "de", "fr": "fr-fr", "es": "es"}

#: Voice variants (``espeak-ng --voices=variant``) the speakers are drawn from: male, female and Klatt voices
#: that every language speaks with (no whisper or croak: the words should stay clear).
VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                             "klatt", "klatt2", "klatt3", "klatt4")

PITCH_RANGE = (25, 75)     # espeak-ng -p, 0-99
RATE_RANGE = (140, 185)    # espeak-ng -s, words per minute


@dataclass(frozen=True)
class MultilingualSize:
    """How big a corpus is: speakers (train, eval), sentences (train-only pool, held out), train sentences per
    speaker and language, seen sentences among the eval ones, languages per eval sentence and speaker."""

    train_speakers: int
    eval_speakers: int
    train_sentences: int
    unseen_sentences: int
    per_speaker: int
    eval_seen: int
    eval_languages: int


SIZES: dict[str, MultilingualSize] = {
    # 16 held-out speakers: with 8, an EER's 95 % CI was about +-0.07, too wide to tell two systems apart
    "demo": MultilingualSize(train_speakers=24, eval_speakers=16, train_sentences=36, unseen_sentences=6,
                             per_speaker=6, eval_seen=8, eval_languages=3),
    "tiny": MultilingualSize(train_speakers=3, eval_speakers=2, train_sentences=6, unseen_sentences=2,
                             per_speaker=2, eval_seen=2, eval_languages=2),
}


@dataclass(frozen=True)
class SyntheticSpeaker:
    """One synthetic speaker: an espeak-ng voice variant with a fixed pitch and rate, in every language."""

    id: str
    variant: str
    pitch: int
    rate: int

    def voice(self, language: str) -> str:
        return f"{ESPEAK_VOICES[language]}+{self.variant}"


@dataclass(frozen=True)
class MultilingualCorpus:
    """A generated corpus on local disk: its manifests, utterance counts per split, seconds of audio."""

    root: Path
    train_manifest: Path
    eval_manifest: Path
    utterances: dict[str, int]
    total_seconds: float
    speakers: dict[str, list[str]]
    languages: list[str]

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The manifest lines of ``split`` (train | eval)."""
        path = self.train_manifest if split == "train" else self.eval_manifest
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @classmethod
    def load(cls, root: str | Path) -> "MultilingualCorpus":
        root = Path(root)
        return cls._from_meta(root, json.loads((root / "corpus.json").read_text(encoding="utf-8")))

    @classmethod
    def _from_meta(cls, root: Path, meta: dict[str, Any]) -> "MultilingualCorpus":
        return cls(root=root, train_manifest=root / "train.jsonl", eval_manifest=root / "eval.jsonl",
                   utterances=dict(meta["utterances"]), total_seconds=float(meta["total_seconds"]),
                   speakers={s: [p["id"] for p in meta["speakers"] if p["split"] == s] for s in ("train", "eval")},
                   languages=list(meta["languages"]))


def sentence_id(index: int) -> str:
    """The id of :data:`SENTENCES`' row ``index`` (0-based): ``s01``, ``s02``, ..."""
    return f"s{index + 1:02d}"


def plan_multilingual(size: str, seed: int) -> tuple[list[SyntheticSpeaker], list[SyntheticSpeaker],
                                                     list[dict[str, Any]]]:
    """(train speakers, eval speakers, utterances) of a corpus; each utterance is a manifest line plus the
    ``voice``, ``pitch`` and ``rate`` to speak it with. Depends only on ``size`` and ``seed``."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    n_sentences = spec.train_sentences + spec.unseen_sentences
    if n_sentences > len(SENTENCES):
        raise ValueError(f"size {size!r} needs {n_sentences} sentences; {len(SENTENCES)} are written")
    order = [int(i) for i in rng.permutation(len(SENTENCES))[:n_sentences]]
    unseen, train_sents = order[:spec.unseen_sentences], order[spec.unseen_sentences:]
    n_speakers = spec.train_speakers + spec.eval_speakers
    variants = [VARIANTS[int(i) % len(VARIANTS)] for i in rng.permutation(max(n_speakers, len(VARIANTS)))[:n_speakers]]
    pitches = rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1, n_speakers)
    rates = rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1, n_speakers)
    speakers = [SyntheticSpeaker(f"spk{k:02d}", variants[k], int(pitches[k]), int(rates[k])) for k in range(n_speakers)]
    train_spk, eval_spk = speakers[:spec.train_speakers], speakers[spec.train_speakers:]

    def utterance(spk: SyntheticSpeaker, sent: int, lang: str, split: str, seen: bool) -> dict[str, Any]:
        sid = sentence_id(sent)
        uid = f"{spk.id}-{sid}-{lang}"
        return {"id": uid, "audio": f"audio/{spk.id}/{uid}.flac", "speaker": spk.id, "language": lang,
                "text": SENTENCES[sent][LANGUAGES.index(lang)], "pivot": SENTENCES[sent][0], "sentence": sid,
                "seen_sentence": seen, "split": split, "voice": spk.voice(lang), "pitch": spk.pitch,
                "rate": spk.rate}

    utts = []
    n_train = len(train_sents)
    for li, lang in enumerate(LANGUAGES):
        shift = li * max(1, n_train // len(LANGUAGES))   # a speaker says other sentences in another language
        for s, spk in enumerate(train_spk):
            for j in range(spec.per_speaker):
                utts.append(utterance(spk, train_sents[(s * spec.per_speaker + j + shift) % n_train], lang,
                                      "train", True))
    eval_sents = [(i, True) for i in train_sents[:spec.eval_seen]] + [(i, False) for i in unseen]
    for e, spk in enumerate(eval_spk):
        for q, (sent, seen) in enumerate(eval_sents):
            for k in range(spec.eval_languages):
                utts.append(utterance(spk, sent, LANGUAGES[(e + q + k) % len(LANGUAGES)], "eval", seen))
    return train_spk, eval_spk, utts


def _render(utt: dict[str, Any], root: str) -> float:
    """Speak one utterance into its FLAC file; its length in seconds."""
    x = synth_speech(utt["text"], utt["voice"], utt["rate"], utt["pitch"])
    y = soxr.resample(x, ESPEAK_RATE, SAMPLE_RATE, quality="HQ")
    peak = float(np.abs(y).max()) if y.size else 0.0
    if peak > 0.95:
        y = y * (0.95 / peak)
    path = os.path.join(root, utt["audio"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, y.astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return y.size / SAMPLE_RATE


_MANIFEST_FIELDS = ("id", "audio", "speaker", "language", "text", "pivot", "sentence", "seen_sentence")


def _cached(root: Path, size: str, seed: int) -> Optional[MultilingualCorpus]:
    try:
        meta = json.loads((root / "corpus.json").read_text(encoding="utf-8"))
        if (meta.get("version"), meta.get("size"), meta.get("seed")) != (MULTILINGUAL_VERSION, size, seed):
            return None
        corpus = MultilingualCorpus._from_meta(root, meta)
        rows = corpus.rows("train") + corpus.rows("eval")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(rows) != sum(corpus.utterances.values()) or not all((root / r["audio"]).is_file() for r in rows):
        return None
    return corpus


def generate_multilingual_corpus(root: str | Path, *, size: Literal["tiny", "demo"] = "demo", seed: int = 0,
                                 force: bool = False, workers: Optional[int] = None,
                                 progress: Optional[Callable[[str], None]] = None) -> MultilingualCorpus:
    """Generate (once; cached by ``corpus.json``) the multilingual corpus under the local folder ``root``
    (relative and ``~`` paths work). ``workers`` threads run espeak-ng (default: 2 per CPU, at most 8); the
    result does not depend on it. ``progress`` gets a line at the start and the end."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    root = Path(os.path.abspath(os.path.expanduser(str(root))))
    say = progress or (lambda _m: None)
    if not force:
        cached = _cached(root, size, seed)
        if cached is not None:
            say(f"multilingual corpus ({size}): cached, {sum(cached.utterances.values())} utterances under {root}")
            return cached
    espeak_binary()   # fail before writing anything
    train_spk, eval_spk, utts = plan_multilingual(size, seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.json").unlink(missing_ok=True)
    say(f"multilingual corpus ({size}): speaking {len(utts)} utterances under {root}")
    t0 = time.perf_counter()
    workers = workers or max(1, min(8, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:   # espeak-ng runs as a subprocess: threads suffice
        seconds = list(pool.map(lambda u: _render(u, str(root)), utts))
    storage = Storage()
    for split in ("train", "eval"):
        lines = [json.dumps({k: u[k] for k in _MANIFEST_FIELDS}, ensure_ascii=False) + "\n"
                 for u in utts if u["split"] == split]
        storage.write_text(str(root / f"{split}.jsonl"), "".join(lines))
    total = float(sum(seconds))
    meta = {
        "version": MULTILINGUAL_VERSION, "size": size, "seed": seed, "languages": list(LANGUAGES),
        "utterances": {s: sum(u["split"] == s for u in utts) for s in ("train", "eval")},
        "seconds": {s: round(sum(d for d, u in zip(seconds, utts) if u["split"] == s), 3) for s in ("train", "eval")},
        "total_seconds": round(total, 3),
        "speakers": [{"id": p.id, "variant": p.variant, "pitch": p.pitch, "rate": p.rate, "split": split}
                     for split, group in (("train", train_spk), ("eval", eval_spk)) for p in group],
        "sentences": {sid: info for sid, info in sorted({u["sentence"]: {"pivot": u["pivot"], "seen": u["seen_sentence"]}
                                                         for u in utts}.items())},
    }
    storage.write_text(str(root / "corpus.json"), json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    say(f"multilingual corpus ({size}): {len(utts)} utterances, {total / 60:.1f} min of audio in "
        f"{time.perf_counter() - t0:.1f} s")
    return MultilingualCorpus._from_meta(root, meta)
