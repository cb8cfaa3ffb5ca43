"""Real encoded audio for the decode tests: known signals written by libsndfile in every format."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from spear.stages.audio import with_ogg_serial

# (format, subtype, extension) for every codec the decoder must read
FORMATS = {
    "wav": ("WAV", "PCM_16", "wav"),
    "flac": ("FLAC", "PCM_16", "flac"),
    "vorbis": ("OGG", "VORBIS", "ogg"),
    "opus": ("OGG", "OPUS", "opus"),
    "mp3": ("MP3", "MPEG_LAYER_III", "mp3"),
}
RATES = (8000, 16000, 22050, 44100, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
LOSSLESS = ("wav", "flac")


def tones(t: np.ndarray, channel: int) -> np.ndarray:
    """Band-limited test signal (all partials below 3.5 kHz): its ideal 16 kHz resampling is exact."""
    if channel == 0:
        return 0.30 * np.sin(2 * np.pi * 440.0 * t) + 0.15 * np.sin(2 * np.pi * 1234.5 * t + 0.3)
    return 0.25 * np.sin(2 * np.pi * 660.0 * t + 1.0) + 0.10 * np.sin(2 * np.pi * 3100.0 * t)


def make_signal(rate: int, channels: int, seconds: float) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return np.stack([tones(t, c) for c in range(channels)], axis=1).astype(np.float32)


def expected_mono(rate_out: int, channels: int, num_samples: int) -> np.ndarray:
    t = np.arange(num_samples) / rate_out
    return np.mean([tones(t, c) for c in range(channels)], axis=0)


def encode(x: np.ndarray, rate: int, codec: str) -> bytes:
    fmt, subtype, _ = FORMATS[codec]
    buf = io.BytesIO()
    # Chunked writes: one large Vorbis write crashes libsndfile 1.2.2.
    with sf.SoundFile(buf, "w", rate, x.shape[1], format=fmt, subtype=subtype) as f:
        for i in range(0, len(x), rate):
            f.write(x[i:i + rate])
    # libsndfile draws an Ogg stream's serial at random: fixed, the same audio is the same bytes on every run
    # (so are its content hash, its segment ids and which of them a codebook fit holds out)
    return with_ogg_serial(buf.getvalue(), 0x5EA2) if fmt == "OGG" else buf.getvalue()


def combos():
    for codec in FORMATS:
        for rate in RATES:
            if codec == "opus" and rate not in OPUS_RATES:
                continue
            for channels in (1, 2):
                yield codec, rate, channels
