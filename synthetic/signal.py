"""Small signal helpers for synthesised audio: fades, shaped noise, a loudness that ranks events fairly.

Example::

    >>> import numpy as np
    >>> x = coloured_noise(np.random.default_rng(0), 16000, 16000, "pink")
    >>> round(float(np.sqrt(np.mean(x**2))), 3)   # unit RMS
    1.0
"""

from __future__ import annotations

import numpy as np
import scipy.fft


def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A draw whose logarithm is uniform between log(lo) and log(hi) (frequencies, durations)."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def fade(x: np.ndarray, sr: int, attack_s: float, release_s: float) -> np.ndarray:
    """Linear fade-in over ``attack_s`` and fade-out over ``release_s`` seconds, in place (also returned)."""
    n = len(x)
    a = min(n // 2, max(1, int(attack_s * sr)))
    r = min(n // 2, max(1, int(release_s * sr)))
    shape = (-1,) + (1,) * (x.ndim - 1)  # (frames,) or (frames, channels)
    x[:a] *= np.linspace(0.0, 1.0, a, endpoint=False).reshape(shape)
    x[n - r:] *= np.linspace(1.0, 0.0, r).reshape(shape)
    return x


def band_noise(rng: np.random.Generator, n: int, sr: int, centre: float, octaves: float) -> np.ndarray:
    """White noise shaped by a Gaussian band on a log-frequency axis (centre in Hz, width in octaves)."""
    m = scipy.fft.next_fast_len(n, real=True)  # an FFT of a prime length is slow
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1.0 / sr)
    dist = np.log2(np.maximum(f, 1.0) / centre) / (octaves / 2)
    spec *= np.exp(-0.5 * dist**2)
    return np.fft.irfft(spec, m)[:n]


def coloured_noise(rng: np.random.Generator, n: int, sr: int, colour: str) -> np.ndarray:
    """Pink (1/f power) or brown (1/f^2 power) noise, high-passed at 20 Hz, unit RMS."""
    m = scipy.fft.next_fast_len(n, real=True)
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1.0 / sr)
    exponent = 0.5 if colour == "pink" else 1.0
    spec *= np.where(f >= 20.0, 1.0 / np.maximum(f, 20.0) ** exponent, 0.0)
    x = np.fft.irfft(spec, m)[:n]
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def momentary_rms(x: np.ndarray, sr: int, window_s: float = 0.05) -> float:
    """Max RMS over 50 ms windows: a level that ranks a short impact and a long tone fairly."""
    w = max(1, int(window_s * sr))
    n = (len(x) + w - 1) // w * w
    frames = np.pad(x, (0, n - len(x))).reshape(-1, w)
    return float(np.sqrt(np.mean(frames**2, axis=1).max()))

