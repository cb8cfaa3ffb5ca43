"""Rendering one planned clip: speech and events mixed, panned, over background noise, written to disk.

A clip depends only on its :class:`~spear.synthetic.plan.ClipPlan` (its own generator is seeded from
the plan), so clips render in any order and in any process.

Example::

    >>> from spear.synthetic.plan import plan_corpus
    >>> row = render_clip(plan_corpus("tiny", seed=0)[0], "/tmp/spear-demo")   # doctest: +SKIP
    >>> row["path"], row["word"]                                                 # doctest: +SKIP
    ('speech/word_0000.wav', 'zero')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soxr

from spear.synthetic.events import EVENT_DURATIONS, pitch_band_label, synth_event, synth_pitched
from spear.synthetic.formats import write_audio
from spear.synthetic.plan import ClipPlan
from spear.synthetic.signal import coloured_noise, fade, momentary_rms
from spear.synthetic.speech import ESPEAK_RATE, synth_speech


def _pan_gains(rng: np.random.Generator, channels: int) -> np.ndarray:
    if channels == 1:
        return np.ones(1)
    angle = (rng.uniform(-0.6, 0.6) + 1.0) * np.pi / 4  # constant-power pan
    return np.array([np.cos(angle), np.sin(angle)]) * np.sqrt(2.0)


def render_clip(plan: ClipPlan, root: str) -> dict[str, Any]:
    """Write the clip of ``plan`` under ``root`` and return its labels (one row of ``labels.jsonl``)."""
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
        if sr != ESPEAK_RATE:
            y = soxr.resample(y, ESPEAK_RATE, sr)
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
        speech = speech / (momentary_rms(speech, sr) + 1e-12)

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
        if cls == "pitched":  # a pitched clip's tone fills most of the clip
            e = synth_pitched(plan.pitch_hz, rng, sr, duration=rng.uniform(0.6, 0.9) * n / sr) * 10 ** (level_db / 20)
        else:
            dur = min(rng.uniform(*EVENT_DURATIONS[cls]), n / sr - 0.1)
            e = synth_event(cls, rng, sr, duration=dur) * 10 ** (level_db / 20)
        start = int(rng.integers(0, n - len(e) + 1))
        mix[start:start + len(e)] += e[:, None] * _pan_gains(rng, ch)
        event_rows.append((start / sr, (start + len(e)) / sr, cls))
    event_rows.sort()

    if plan.background is not None:
        # Level relative to the primary event (momentary RMS 1); stereo gets decorrelated channels.
        noise = np.stack([coloured_noise(rng, n, sr, plan.background) for _ in range(ch)], axis=1)
        mix += noise * 10 ** (-plan.snr_db / 20)

    # Peak well below full scale: lossy decoders overshoot a little.
    mix = fade(mix, sr, 0.01, 0.01)
    mix *= rng.uniform(0.25, 0.7) / (np.abs(mix).max() + 1e-12)
    write_audio(Path(root) / plan.relpath, mix.astype(np.float32), sr, plan.fmt)

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
        "pitch_hz": None if plan.pitch_hz is None else round(plan.pitch_hz, 2),
        "pitch_band": None if plan.pitch_hz is None else pitch_band_label(plan.pitch_hz),
    }


def render_indexed(args: tuple[ClipPlan, str]) -> tuple[int, dict[str, Any]]:
    """(plan index, labels) of :func:`render_clip`: the form a worker pool hands back."""
    return args[0].index, render_clip(*args)

