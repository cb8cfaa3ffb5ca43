"""The audio file formats and sample rates the demo corpus is written in, and the writer.

The formats and rates a real corpus brings (wav, flac, ogg/vorbis, ogg/opus, mp3 at 8 to 48 kHz),
so the decode stage sees them all.

Example::

    >>> FORMATS["opus"][3]      # Opus only encodes at some rates
    (8000, 16000, 48000)
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

from spear.stages.audio import with_ogg_serial

#: Every sample rate the corpus uses.
SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 22050, 44100, 48000)

#: format name -> (libsndfile format, subtype, file extension, allowed sample rates)
FORMATS: dict[str, tuple[str, str, str, tuple[int, ...]]] = {
    "wav": ("WAV", "PCM_16", ".wav", SAMPLE_RATES),
    "flac": ("FLAC", "PCM_16", ".flac", SAMPLE_RATES),
    "ogg": ("OGG", "VORBIS", ".ogg", SAMPLE_RATES),
    # Opus only encodes at 8/12/16/24/48 kHz.
    "opus": ("OGG", "OPUS", ".opus", (8000, 16000, 48000)),
    "mp3": ("MP3", "MPEG_LAYER_III", ".mp3", SAMPLE_RATES),
}
#: Lossless formats: a file holds exactly the synthesised samples.
LOSSLESS_FORMATS = ("wav", "flac")


def write_audio(path: Path, x: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Write (frames, channels) float audio in ~1 s chunks (libsndfile's Vorbis encoder
    crashes on one long write). The same audio gives the same bytes in every format: an Ogg
    file's stream serial number, which libsndfile draws at random, is set from the file name,
    so a corpus' content hashes (and the segment ids, codebook samples and tokens that follow
    from them) do not change from one generation to the next."""
    major, subtype, _, _ = FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=x.shape[1], format=major, subtype=subtype) as f:
        for start in range(0, len(x), sample_rate):
            f.write(x[start:start + sample_rate])
    if major == "OGG":
        path.write_bytes(with_ogg_serial(path.read_bytes(), zlib.crc32(path.name.encode())))
