"""Audio codecs for the pipeline: decode any supported object, cut it into 16 kHz mono
segments, and the FLAC (PCM 16) encoding that segments and token shards store.

Decoding uses soundfile (libsndfile: wav, flac, ogg/vorbis, ogg/opus, mp3) and soxr for
resampling, streamed block by block so memory stays bounded by one segment plus the
encoded object. torchaudio is never needed.

Example::

    >>> import numpy as np
    >>> from spear.stages.audio import flac_encode, flac_decode, float_to_pcm16
    >>> x = (np.sin(np.arange(1600) / 10) * 0.5).astype(np.float32)
    >>> y = flac_decode(flac_encode(float_to_pcm16(x)))
    >>> float(np.abs(x - y).max()) < 1 / 32768
    True
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr


class AudioDecodeError(ValueError):
    """An object that cannot be turned into audio; ``reason`` is what goes into the quarantine table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SourceAudioInfo:
    sample_rate: int
    channels: int
    format: str  # libsndfile's format name, e.g. "FLAC", "OGG", "MPEG", "WAV"


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> int16 with rounding and clipping (the inverse of pcm16_to_float)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def pcm16_to_float(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float32) / np.float32(32768.0)).astype(np.float32, copy=False)


def flac_encode(pcm16: np.ndarray, sample_rate: int = 16000, compression_level: int = 0) -> bytes:
    """Mono int16 samples -> FLAC bytes (lossless)."""
    if pcm16.dtype != np.int16:
        raise TypeError(f"flac_encode expects int16 samples, got {pcm16.dtype}")
    buf = io.BytesIO()
    with sf.SoundFile(buf, mode="w", samplerate=sample_rate, channels=1, format="FLAC", subtype="PCM_16",
                      compression_level=compression_level / 8.0) as f:
        f.write(pcm16)
    return buf.getvalue()


def flac_decode_pcm16(data: bytes) -> np.ndarray:
    """FLAC bytes of a mono segment -> int16 samples."""
    pcm, _ = sf.read(io.BytesIO(data), dtype="int16", always_2d=False)
    return pcm


def flac_decode(data: bytes) -> np.ndarray:
    """FLAC bytes of a mono segment -> float32 samples in [-1, 1) (exactly what the teachers see)."""
    return pcm16_to_float(flac_decode_pcm16(data))


def _wav_missing_bytes(data: bytes) -> int:
    """Bytes a RIFF/WAVE object's data chunk declares beyond what the object holds (0 if whole or not WAV)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"data":
            if size in (0, 0xFFFFFFFF):  # streamed writers leave the size open
                return 0
            return max(0, pos + 8 + size - len(data))
        pos += 8 + size + (size & 1)
    return 0


def _open(data: bytes) -> sf.SoundFile:
    if len(data) == 0:
        raise AudioDecodeError("empty object (0 bytes)")
    try:
        return sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as exc:
        raise AudioDecodeError(f"unsupported or corrupt audio: {exc.error_string}") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AudioDecodeError(f"unsupported or corrupt audio: {exc}") from None


def decode_segments(data: bytes, *, target_rate: int = 16000, max_segment_seconds: float = 30.0,
                    min_segment_seconds: float = 0.0, block_seconds: float = 10.0
                    ) -> tuple[SourceAudioInfo, list[tuple[int, np.ndarray]]]:
    """Decode an encoded audio object into consecutive 16 kHz mono int16 segments.

    Returns the source's format info and ``[(offset, pcm16), ...]`` where offsets are in
    output samples; the segments tile the resampled signal exactly (each sample once).
    Raises :class:`AudioDecodeError` for anything that is not usable audio: empty,
    unsupported, corrupt or truncated data, zero-length audio, NaN/inf samples.
    """
    f = _open(data)
    with f:
        info = SourceAudioInfo(sample_rate=int(f.samplerate), channels=int(f.channels), format=str(f.format))
        if info.sample_rate <= 0 or info.channels <= 0:
            raise AudioDecodeError(f"invalid header: {info.sample_rate} Hz, {info.channels} channels")
        declared = int(f.frames) if f.frames and f.frames > 0 else None
        max_samples = int(round(max_segment_seconds * target_rate))
        resampler = (soxr.ResampleStream(info.sample_rate, target_rate, 1, dtype="float32", quality="HQ")
                     if info.sample_rate != target_rate else None)
        block = max(1024, int(block_seconds * info.sample_rate))
        downmix = np.full(info.channels, 1.0 / info.channels, dtype=np.float32)
        pending: list[np.ndarray] = []
        pending_len = 0
        out: list[tuple[int, np.ndarray]] = []
        emitted = 0
        frames_read = 0

        def emit_full() -> None:
            nonlocal pending, pending_len, emitted
            while pending_len >= max_samples:
                joined = np.concatenate(pending)
                seg, rest = joined[:max_samples], joined[max_samples:]
                out.append((emitted, float_to_pcm16(seg)))
                emitted += max_samples
                pending, pending_len = ([rest] if rest.size else []), rest.size

        try:
            while True:
                chunk = f.read(block, dtype="float32", always_2d=True)
                if chunk.shape[0] == 0:
                    break
                # Downmix as a BLAS mat-vec: numpy's mean over a short inner axis is ~30x slower.
                mono = chunk @ downmix if info.channels > 1 else chunk[:, 0]
                # NaN/inf in any channel survives the downmix (inf - inf = NaN), so one check on mono suffices.
                if not np.isfinite(mono).all():
                    bad = int(np.argmax(~np.isfinite(chunk).all(axis=1))) + frames_read
                    raise AudioDecodeError(f"non-finite (NaN/inf) samples, first at sample {bad}")
                frames_read += chunk.shape[0]
                y = resampler.resample_chunk(mono, last=False) if resampler is not None else mono
                if y.size:
                    pending.append(np.ascontiguousarray(y, dtype=np.float32))
                    pending_len += y.size
                    emit_full()
            if resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                if tail.size:
                    pending.append(tail.astype(np.float32, copy=False))
                    pending_len += tail.size
            emit_full()
        except sf.LibsndfileError as exc:
            raise AudioDecodeError(f"corrupt audio after {frames_read} frames: {exc.error_string}") from None
        except RuntimeError as exc:
            raise AudioDecodeError(f"corrupt audio after {frames_read} frames: {exc}") from None

        if frames_read == 0:
            raise AudioDecodeError("zero-length audio (no samples)")
        # libsndfile returns short reads for a cut-off wav/flac instead of failing: compare with the header.
        if declared is not None and info.format in ("WAV", "WAVEX", "FLAC", "AIFF") and frames_read < declared:
            raise AudioDecodeError(f"truncated: {frames_read} of {declared} frames present")
        missing = _wav_missing_bytes(data)
        if missing:
            raise AudioDecodeError(f"truncated: the WAV data chunk lacks {missing} of its declared bytes")
        if pending_len:
            last = np.concatenate(pending)
            if last.size >= min_segment_seconds * target_rate:
                out.append((emitted, float_to_pcm16(last)))
    return info, out
