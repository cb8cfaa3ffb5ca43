"""A small labelled corpus of mixed speech and general audio for ``spear demo``.

Speech is synthesised with espeak-ng (several voices and variants, varied speed and
pitch, dozens of words and short sentences); general audio is made of procedural sound
events of ten classes (1 to 5 per clip, some over pink/brown background noise, some mixed
with speech). Files are written in wav, flac, ogg/vorbis, ogg/opus and mp3, at 8, 16,
22.05, 44.1 and 48 kHz, mono and stereo, 1 s to 2 min long: the formats and rates a real
corpus brings, so the decode stage sees them all. Every file's labels go to
``labels.jsonl`` for the probes that evaluate a student later.

This module plans, renders and caches the whole corpus; the parts live beside it:
:mod:`~spear.synthetic.speech` (espeak-ng), :mod:`~spear.synthetic.events` (sound events),
:mod:`~spear.synthetic.plan` (every clip decided from the seed), :mod:`~spear.synthetic.render`
(one clip to disk) and :mod:`~spear.synthetic.formats` (file formats and rates).

Layout under ``root``::

    speech/     speech-only clips (domain "speech")
    audio/      sound-event clips and speech + event mixtures (domain "audio")
    labels.jsonl  one JSON object per file (see :func:`generate_demo_corpus`)
    corpus.json   version, size, seed, counts, total seconds: the cache key

Generation is deterministic given the seed (the same labels and the same bytes in every
format: :func:`~spear.synthetic.formats.write_audio` fixes the Ogg stream serial number that
libsndfile draws at random), and cached: a second call with the same version, size and seed
returns at once.

Example::

    >>> from spear.synthetic.corpus import generate_demo_corpus
    >>> corpus = generate_demo_corpus("/tmp/spear-demo", size="tiny")   # doctest: +SKIP
    >>> corpus.num_files, round(corpus.total_seconds)                  # doctest: +SKIP
    (31, 55)
    >>> corpus.labels()[0]["speaker"]                                  # doctest: +SKIP
    'en'
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from spear.cluster.storage import Storage
from spear.synthetic.events import EVENT_CLASSES
from spear.synthetic.plan import SIZES, plan_corpus
from spear.synthetic.render import render_clip, render_indexed
from spear.synthetic.speech import SPEAKERS, WORDS, espeak_binary

#: Bumped when the same size and seed would give another corpus: a cached one is then regenerated.
CORPUS_VERSION = 3  # 2: pitched tones, 700 shorter mixtures with half of them test clips; 3: 480 event clips, half test


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


def generate_demo_corpus(root: str | Path, *, size: Literal["tiny", "demo"] = "demo", seed: int = 0,
                         force: bool = False, progress: Callable[[str], None] | None = None,
                         workers: int | None = None) -> DemoCorpus:
    """Generate (once; cached) the labelled demo corpus under the local directory ``root``.

    ``size="tiny"`` (tests): 31 files, about a minute of audio, every format, sample rate
    and channel count. ``size="demo"`` (``spear demo``): 1920 files, about an hour: every
    one of 44 words by each of 9 voices, 100 sentences, 480 event clips, 700 short speech + event
    mixtures and 240 pitched tones (half of these three kinds are test clips), and 4 files of 30-60 s.

    Each line of ``labels.jsonl`` holds: ``path`` (relative to root), ``domain``
    ("speech" | "audio"), ``kind`` (word | sentence | long_speech | events | mixed |
    pitched | long_audio), ``format`` (wav | flac | ogg | opus | mp3), ``sample_rate``, ``channels``,
    ``duration`` (s), ``split`` ("train" | "test", stratified by word / speaker / primary
    event), ``speaker`` (espeak-ng voice id or null), ``word`` (single-word utterances, else
    null), ``text``, ``speech_span`` ([start, end] s of the speech), ``speech_segments``
    ([start, end, text] per utterance; several in a long speech file), ``has_speech``,
    ``events`` (class names in onset order), ``event_times`` ([start, end] s each),
    ``event_count``, ``primary_event`` (the loudest event: the others are 3-12 dB below it),
    ``background`` ("pink" | "brown" | null), ``snr_db`` (background relative to the
    primary event), ``pitch_hz`` and ``pitch_band`` (pitched tones: the fundamental and its
    quarter-octave band; else null). Speech clips have ``events == []`` and ``event_count == 0``.

    If ``root/corpus.json`` records the same version, size and seed and every listed file
    exists, nothing is written and the cached corpus is returned (unless ``force``).
    ``workers`` processes render the clips (default: 1 for tiny, up to 2 for demo); the
    result does not depend on it. ``progress`` receives a short line now and then.

    Example::

        >>> corpus = generate_demo_corpus("/tmp/spear-demo", size="tiny", progress=print)  # doctest: +SKIP
        demo corpus (tiny): generating 25 files under /tmp/spear-demo
        ...
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
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

    espeak_binary()  # fail before touching anything
    root.mkdir(parents=True, exist_ok=True)
    _remove_previous(root)
    plans = plan_corpus(size, seed)
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
            collect(render_clip(*job), job[0].index)
    else:
        # spawn, not fork: the caller may already run threads (Ray) that fork would copy mid-flight.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for index, row in pool.imap_unordered(render_indexed, jobs, chunksize=4):
                collect(row, index)

    assert all(r is not None for r in rows)
    total = float(sum(r["duration"] for r in rows))
    Storage().write_text(str(root / "labels.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

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
        "speakers": [s.voice for s in SPEAKERS[: SIZES[size].speakers]],
        "words": list(WORDS[: SIZES[size].words]),
    }
    Storage().write_text(str(root / "corpus.json"), json.dumps(meta, indent=2) + "\n")
    say(f"demo corpus ({size}): {len(rows)} files, {total / 60:.1f} min of audio "
        f"in {time.perf_counter() - t0:.1f} s")
    return DemoCorpus._from_meta(root, meta)
