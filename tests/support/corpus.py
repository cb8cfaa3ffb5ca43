"""A small mixed corpus of real encoded files for pipeline tests (speech-like and event-like signals)."""

from __future__ import annotations

import numpy as np

from spear.cluster.storage import join_uri

from support.audio_files import encode


def speechlike(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Voiced-like harmonic stacks with a syllable-rate envelope and a wandering f0."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum((0.5 / k) * np.sin(k * phase) for k in range(1, 8))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t), 0, None)
    return (0.3 * env * x / 1.5).astype(np.float32)


def eventlike(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Noise bursts and chirps."""
    n = int(seconds * rate)
    x = 0.01 * rng.standard_normal(n)
    for _ in range(rng.integers(1, 4)):
        start = rng.integers(0, max(1, n - rate // 2))
        length = int(rng.uniform(0.1, 0.5) * rate)
        t = np.arange(length) / rate
        if rng.random() < 0.5:
            burst = rng.standard_normal(length) * np.exp(-t * rng.uniform(5, 20))
        else:
            f = rng.uniform(300, 2000) + rng.uniform(500, 3000) * t / t[-1]
            burst = np.sin(2 * np.pi * np.cumsum(f) / rate)
        x[start:start + length] += 0.3 * burst[: n - start]
    return x.astype(np.float32)


def write_mixed_corpus(storage, root: str, *, n_speech: int = 6, n_audio: int = 4, seed: int = 0,
                       seconds: tuple[float, float] = (1.5, 4.0)) -> dict[str, list[str]]:
    """root/speech/*.{flac,wav} and root/audio/*.{ogg,flac}: returns {"speech": uris, "audio": uris}."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"speech": [], "audio": []}
    for i in range(n_speech):
        rate, codec = [(16000, "flac"), (22050, "wav"), (44100, "flac")][i % 3]
        x = speechlike(rng, rng.uniform(*seconds), rate)[:, None]
        uri = join_uri(root, "speech", f"utt{seed}_{i:03d}.{ 'wav' if codec == 'wav' else 'flac'}")
        storage.write_bytes(uri, encode(x, rate, codec))
        out["speech"].append(uri)
    for i in range(n_audio):
        rate, codec, ext = [(48000, "flac", "flac"), (22050, "vorbis", "ogg")][i % 2]
        x = eventlike(rng, rng.uniform(*seconds), rate)
        x = np.stack([x, np.roll(x, 7)], axis=1)
        uri = join_uri(root, "audio", f"clip{seed}_{i:03d}.{ext}")
        storage.write_bytes(uri, encode(x, rate, codec))
        out["audio"].append(uri)
    return out
