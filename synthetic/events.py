"""Procedural sound events of ten classes, the general-audio half of the demo corpus.

Each class has its own signature (tonal or noisy, steady or decaying, fixed or moving pitch), so a
probe can tell them apart; parameters are drawn within the class from the caller's generator, so
the same generator state gives the same event.

Example::

    >>> import numpy as np
    >>> x = synth_event("bell", np.random.default_rng(0), 16000, duration=1.0)
    >>> x.shape
    (16000,)
"""

from __future__ import annotations

import numpy as np

from spear.synthetic.signal import band_noise, fade, loguniform, momentary_rms

#: The event classes, in the order the corpus cycles through them as primary event.
EVENT_CLASSES: tuple[str, ...] = (
    "tone", "chirp", "noise_burst", "impact", "harmonic",
    "am_tone", "fm_tone", "click_train", "siren", "bell",
)

#: Event duration range per class, seconds.
EVENT_DURATIONS: dict[str, tuple[float, float]] = {
    "tone": (0.3, 2.0), "chirp": (0.2, 1.5), "noise_burst": (0.1, 1.0), "impact": (0.15, 0.6),
    "harmonic": (0.4, 2.0), "am_tone": (0.5, 2.0), "fm_tone": (0.5, 2.0), "click_train": (0.3, 1.5),
    "siren": (1.0, 3.0), "bell": (0.5, 2.5),
}


#: The pitch bands of the demo's pitched tones: twelve quarter-octave (3-semitone) bands from 110 Hz (A2)
#: to 880 Hz (A5). Half-octave bands were too coarse: mean-pooled log-mel told them apart as well as CREPE.
PITCH_BANDS: tuple[tuple[float, float], ...] = tuple(
    (110.0 * 2 ** (k / 4), 110.0 * 2 ** ((k + 1) / 4)) for k in range(12))


def pitch_band_label(f0: float) -> str:
    """The label of the pitch band holding ``f0`` (Hz), e.g. ``'185-220Hz'``.

    >>> pitch_band_label(200.0)
    '185-220Hz'
    """
    for lo, hi in PITCH_BANDS:
        if lo <= f0 < hi:
            return f"{lo:.0f}-{hi:.0f}Hz"
    raise ValueError(f"{f0} Hz is outside the pitch bands ({PITCH_BANDS[0][0]:.0f}-{PITCH_BANDS[-1][1]:.0f} Hz)")


def synth_pitched(f0: float, rng: np.random.Generator, sample_rate: int, duration: float) -> np.ndarray:
    """A harmonic complex tone at fundamental ``f0`` whose timbre says nothing about its pitch.

    The partials' count (3-12), spectral tilt and a formant-like resonance (centre 300-3000 Hz)
    are drawn independently of ``f0``, and in 40 % of draws the lowest one or two partials are
    removed (a missing fundamental: the pitch is still heard at ``f0``, as a pitch tracker
    reports it); a slight vibrato (<= 1 %) keeps it natural. Scaled to a momentary RMS of 1.

    >>> x = synth_pitched(220.0, np.random.default_rng(0), 16000, duration=1.0)
    >>> x.shape
    (16000,)
    """
    sr = sample_rate
    n = max(int(round(duration * sr)), int(0.05 * sr))
    t = np.arange(n) / sr
    nyq = 0.45 * sr
    vibrato = 1.0 + rng.uniform(0.0, 0.01) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    phase = 2 * np.pi * f0 * np.cumsum(vibrato) / sr
    tilt, formant = rng.uniform(0.0, 1.5), loguniform(rng, 300, 3000)
    first = 1 + (int(rng.integers(1, 3)) if rng.random() < 0.4 else 0)
    x = np.zeros(n)
    for h in range(first, first + int(rng.integers(3, 13))):
        if h * f0 * 1.01 >= nyq:
            break
        resonance = np.exp(-0.5 * (np.log2(h * f0 / formant) / 0.8) ** 2)
        x += h ** -tilt * (0.3 + resonance) * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    return fade(x, sr, 0.02, 0.05) / (momentary_rms(x, sr) + 1e-12)


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
    if name not in EVENT_DURATIONS:
        raise ValueError(f"unknown event class {name!r}; known: {', '.join(EVENT_CLASSES)}")
    sr = sample_rate
    if duration is None:
        duration = rng.uniform(*EVENT_DURATIONS[name])
    n = max(int(round(duration * sr)), int(0.05 * sr))
    t = np.arange(n) / sr
    nyq = 0.45 * sr  # keep every partial clear of the Nyquist frequency (8 kHz files too)

    if name == "tone":
        f = min(loguniform(rng, 200, 2000), nyq)
        x = fade(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)), sr, 0.01, 0.02)
    elif name == "chirp":
        f0, f1 = loguniform(rng, 150, 600), min(loguniform(rng, 1500, 6000), nyq)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        d = n / sr
        k = np.log(f1 / f0)
        phase = 2 * np.pi * f0 * d / k * (np.exp(k * t / d) - 1.0)
        x = fade(np.sin(phase), sr, 0.01, 0.01)
    elif name == "noise_burst":
        centre = min(loguniform(rng, 400, 6000), 0.6 * nyq)
        x = fade(band_noise(rng, n, sr, centre, rng.uniform(0.5, 2.0)), sr, 0.005, 0.01)
    elif name == "impact":
        tau = rng.uniform(0.01, 0.05)
        click = rng.standard_normal(n) * np.exp(-t / tau)
        f_thud = loguniform(rng, 50, 150)
        thud = np.sin(2 * np.pi * f_thud * t) * np.exp(-t / rng.uniform(0.05, 0.2))
        x = click + rng.uniform(1.0, 4.0) * thud
        x = fade(x, sr, 0.0005, 0.01)
    elif name == "harmonic":
        f0 = loguniform(rng, 100, 400)
        x = np.zeros(n)
        slope = rng.uniform(0.5, 1.5)
        for h in range(1, int(rng.integers(5, 13)) + 1):
            if h * f0 >= nyq:
                break
            x += h ** -slope * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
        x = fade(x, sr, 0.02, 0.05)
    elif name == "am_tone":
        fc = min(loguniform(rng, 300, 3000), nyq)
        rate, depth = rng.uniform(4, 20), rng.uniform(0.7, 1.0)
        env = 1.0 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
        x = fade(env * np.sin(2 * np.pi * fc * t), sr, 0.01, 0.02)
    elif name == "fm_tone":
        fc = loguniform(rng, 400, 2000)
        fm, dev = rng.uniform(4, 12), rng.uniform(0.08, 0.25) * fc
        phase = 2 * np.pi * fc * t + dev / fm * np.sin(2 * np.pi * fm * t)
        x = fade(np.sin(phase), sr, 0.01, 0.02)
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
        centre = loguniform(rng, 600, 1200)
        dev, rate = rng.uniform(0.3, 0.5) * centre, rng.uniform(0.3, 1.5)
        phase0 = rng.uniform(0, 2 * np.pi)
        inst_f = centre + dev * np.sin(2 * np.pi * rate * t + phase0)
        phase = 2 * np.pi * np.cumsum(inst_f) / sr
        x = np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)
        x = fade(x, sr, 0.05, 0.1)
    elif name == "bell":
        f0 = loguniform(rng, 300, 1500)
        tau = rng.uniform(0.2, 0.8)
        x = np.zeros(n)
        for ratio, amp in ((1.0, 1.0), (2.0, 0.6), (2.76, 0.5), (5.40, 0.3), (8.93, 0.2)):
            f = f0 * ratio * (1.0 + rng.normal(0, 0.01))
            if f >= nyq:
                continue
            x += amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t * np.sqrt(ratio) / tau)
        x = fade(x, sr, 0.001, 0.02)
    return x / (momentary_rms(x, sr) + 1e-12)
