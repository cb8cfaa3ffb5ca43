"""Shared pieces of the benchmarks: a cached corpus of mixed-format audio, a steady-state rate, a timer.

A bench script imports it as ``common``: ``python bench/NAME.py`` puts bench/ first on sys.path."""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import soundfile as sf

MIX = [  # (codec, subtype, ext, rate, channels, share of files)
    ("FLAC", "PCM_16", "flac", 44100, 2, 0.45),
    ("WAV", "PCM_16", "wav", 16000, 1, 0.2),
    ("OGG", "VORBIS", "ogg", 22050, 2, 0.15),
    ("MP3", "MPEG_LAYER_III", "mp3", 48000, 2, 0.1),
    ("OGG", "OPUS", "opus", 48000, 1, 0.1),
]


def make_corpus(root: str, minutes: float, file_seconds: float = 40.0, seed: int = 0) -> list[str]:
    os.makedirs(root, exist_ok=True)
    n_files = int(np.ceil(minutes * 60 / file_seconds))
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(MIX), size=n_files, p=[m[-1] for m in MIX])
    paths = []
    for i, k in enumerate(kinds):
        fmt, sub, ext, rate, ch, _ = MIX[k]
        path = os.path.join(root, f"f{i:04d}.{ext}")
        paths.append(path)
        if os.path.exists(path):
            continue
        n = int(file_seconds * rate)
        t = np.arange(n) / rate
        # speech-like: noise shaped by a slow envelope plus a few tones
        env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
        sig = 0.1 * env * rng.standard_normal(n) + 0.1 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t)
        x = np.stack([sig] * ch, axis=1).astype(np.float32)
        tmp = path + ".tmp"
        with sf.SoundFile(tmp, "w", rate, ch, format=fmt, subtype=sub) as f:
            for j in range(0, n, rate):  # chunked: one big Vorbis write crashes libsndfile
                f.write(x[j:j + rate])
        os.replace(tmp, path)
    return paths


def steady_state(full_seconds: float, full_wall: float, part_seconds: float,
                 part_wall: float) -> tuple[Optional[float], Optional[float], str]:
    """(audio s per wall s, fixed wall s per run, how they were got) from a full run and a shorter run
    of the same job.

    The difference of the two runs cancels what every run pays once (planning, start-up, commit).
    When the full run took hardly longer than the shorter one (under a fifth of its wall more), that
    difference is noise: the rate and the fixed cost are None and the text says so.

    >>> steady_state(100.0, 10.0, 25.0, 5.0)[:2]
    (15.0, 3.333333333333334)
    >>> steady_state(100.0, 10.0, 25.0, 9.5)[:2]
    (None, None)
    """
    if full_seconds <= part_seconds or full_wall - part_wall < 0.2 * full_wall:
        return None, None, (f"not measurable: the full run ({full_wall:.1f} s) took hardly longer than the shorter "
                            f"run ({part_wall:.1f} s): the fixed cost dominates; bench more audio")
    rate = (full_seconds - part_seconds) / (full_wall - part_wall)
    return rate, max(0.0, full_wall - full_seconds / rate), "(full - shorter run audio) / (full - shorter run wall)"


def timed(fn, min_seconds: float = 1.0):
    """(result, seconds per call) of ``fn`` over as many calls as fill ``min_seconds`` (at least one)."""
    calls, t0 = 0, time.perf_counter()
    while True:
        result = fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return result, elapsed / calls
