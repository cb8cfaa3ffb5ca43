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
from dataclasses import dataclass, replace
from typing import Iterator, Optional

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
    partial: Optional[str] = None  # why the object decoded only in part (truncated, damaged); None when whole
    declared_seconds: Optional[float] = None  # the whole object's length as its header declares it, when known


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


def _wav_missing(data: bytes) -> tuple[int, int]:
    """(bytes the RIFF/WAVE data chunk declares beyond what the object holds, bytes per frame);
    (0, 0) if whole or not WAV."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0, 0
    pos, block_align = 12, 0
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"fmt " and pos + 22 <= len(data):
            block_align = int.from_bytes(data[pos + 20:pos + 22], "little")
        if cid == b"data":
            if size in (0, 0xFFFFFFFF):  # streamed writers leave the size open
                return 0, 0
            return max(0, pos + 8 + size - len(data)), block_align
        pos += 8 + size + (size & 1)
    return 0, 0


@dataclass(frozen=True)
class OggPage:
    """One page of an Ogg stream: where it starts and ends in the object, and its header fields."""
    start: int
    end: int
    end_of_stream: bool


def ogg_pages(data: bytes) -> Iterator[Optional[OggPage]]:
    """The whole pages of an Ogg object, in order; a last None when the bytes end inside a page header,
    its segment table or its body (a cut-off object). Stops at bytes that do not start a page."""
    pos = 0
    while pos < len(data) and data[pos:pos + 4] == b"OggS":
        nseg = data[pos + 26] if pos + 27 <= len(data) else None
        # a cut segment table sums short, but the end still lies past the bytes
        end = None if nseg is None else pos + 27 + nseg + sum(data[pos + 27:pos + 27 + nseg])
        if end is None or end > len(data):
            yield None
            return
        yield OggPage(pos, end, bool(data[pos + 5] & 4))
        pos = end


def _ogg_complete(data: bytes) -> bool:
    """Whether an Ogg object ends with a whole end-of-stream page (a cut-off one does not).

    libsndfile reads a truncated Ogg without complaint, so this walk over the page headers
    (27 bytes + segment table each, a few thousand per hour of audio) is the only sign of the cut.
    Bytes after a whole end-of-stream page (a tag, padding) are not a cut.
    """
    eos = False
    for page in ogg_pages(data):
        if page is None:
            return False
        eos = page.end_of_stream
    return eos


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):  # CRC-32 with polynomial 0x04c11db7, not bit-reflected (Ogg's, unlike zlib's)
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC_TABLE = _ogg_crc_table()


def ogg_page_crc(page: bytes) -> int:
    """The checksum of one Ogg page, computed with its checksum field (bytes 22-25) as zero."""
    crc, table = 0, _OGG_CRC_TABLE
    for b in page[:22] + bytes(4) + page[26:]:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


def with_ogg_serial(data: bytes, serial: int) -> bytes:
    """The Ogg object ``data`` (one logical stream) with its stream serial number set to ``serial``.

    libsndfile draws the serial at random, so the same audio encodes to different bytes on every
    write; with a fixed serial, the bytes (and so their content hash) are the same each time.

    Example::

        >>> import io, numpy as np, soundfile as sf
        >>> buf = io.BytesIO()
        >>> sf.write(buf, np.zeros(800), 8000, format="OGG", subtype="VORBIS")
        >>> fixed = with_ogg_serial(buf.getvalue(), 7)
        >>> sf.read(io.BytesIO(fixed))[0].shape, fixed[14:18] == (7).to_bytes(4, "little")
        ((800,), True)
    """
    out = bytearray(data)
    for page in ogg_pages(data):
        if page is None:
            raise ValueError("not a whole Ogg object: the bytes end inside a page")
        out[page.start + 14:page.start + 18] = int(serial).to_bytes(4, "little")
        crc = ogg_page_crc(bytes(out[page.start:page.end]))
        out[page.start + 22:page.start + 26] = crc.to_bytes(4, "little")
    return bytes(out)


# Frames per read when re-reading a damaged stretch: libsndfile drops the whole read that fails,
# so small reads keep all but the last few ms before the damage.
_SALVAGE_BLOCK = 1024


def _error_text(exc: Exception) -> str:
    text = getattr(exc, "error_string", None) or str(exc)
    return text.removeprefix("Error : ").rstrip(".")


def _chunks(f: sf.SoundFile, data: bytes, block: int, damage: list[str]) -> Iterator[np.ndarray]:
    """``f``'s frames in reads of ``block``. A codec error ends the stream with its cause appended to
    ``damage``, after the failing read is redone in small reads from a fresh handle (a failed read
    returns nothing, so a truncated FLAC would otherwise lose up to ``block`` good frames)."""
    pos = 0
    while True:
        try:
            chunk = f.read(block, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            damage.append(_error_text(exc))
            try:
                g = sf.SoundFile(io.BytesIO(data))
                g.seek(pos)
            except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
                return
            with g:
                while True:
                    try:
                        chunk = g.read(_SALVAGE_BLOCK, dtype="float32", always_2d=True)
                    except (sf.LibsndfileError, RuntimeError):
                        return
                    if chunk.shape[0] == 0:
                        return
                    yield chunk
        if chunk.shape[0] == 0:
            return
        pos += chunk.shape[0]
        yield chunk


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
                    min_segment_seconds: float = 0.0, block_seconds: float = 10.0, keep_partial: bool = False
                    ) -> tuple[SourceAudioInfo, list[tuple[int, np.ndarray]]]:
    """Decode an encoded audio object into consecutive 16 kHz mono int16 segments.

    Returns the source's format info and ``[(offset, pcm16), ...]`` where offsets are in
    output samples; the segments tile the resampled signal exactly (each sample once).
    Raises :class:`AudioDecodeError` for anything that is not usable audio: empty,
    unsupported, corrupt or truncated data, zero-length audio, NaN/inf samples.

    With ``keep_partial`` a truncated or damaged object keeps the audio decoded before the
    damage: ``info.partial`` says what is missing and why, ``info.declared_seconds`` how long
    the header says the whole is (None when it does not say, e.g. Ogg). It still raises when
    nothing before the damage decodes.
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
        damage: list[str] = []

        def emit_full() -> None:
            nonlocal pending, pending_len, emitted
            while pending_len >= max_samples:
                joined = np.concatenate(pending)
                seg, rest = joined[:max_samples], joined[max_samples:]
                out.append((emitted, float_to_pcm16(seg)))
                emitted += max_samples
                pending, pending_len = ([rest] if rest.size else []), rest.size

        for chunk in _chunks(f, data, block, damage):
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

        # What is missing, and how long the whole would be: libsndfile returns short reads for a cut-off
        # WAV/FLAC/MP3 instead of failing (compare with the header) and reads a cut-off Ogg silently.
        cause, whole = None, None
        missing, frame_bytes = _wav_missing(data)
        if damage:
            cause = f"corrupt audio after {frames_read} frames: {damage[0]}"
            whole = declared if declared and declared > frames_read else None
        elif missing:
            cause = f"truncated: the WAV data chunk lacks {missing} of its declared bytes"
            whole = frames_read + missing // frame_bytes if frame_bytes else None
        elif declared is not None and info.format in ("WAV", "WAVEX", "FLAC", "AIFF", "MP3", "MPEG") \
                and frames_read < declared - (declared // 100 if info.format in ("MP3", "MPEG") else 0):
            # (an MP3's length comes from its Xing/LAME header, which some encoders fill in roughly)
            cause, whole = f"truncated: {frames_read} of {declared} frames present", declared
        elif info.format == "OGG" and not _ogg_complete(data):
            cause = "truncated: the Ogg stream ends without its end-of-stream page"
        if frames_read == 0:
            raise AudioDecodeError(cause or "zero-length audio (no samples)")
        if cause is not None:
            if not keep_partial:
                raise AudioDecodeError(cause)
            info = replace(info, partial=cause,
                           declared_seconds=whole / info.sample_rate if whole else None)
        if pending_len:
            last = np.concatenate(pending)
            if last.size >= min_segment_seconds * target_rate:
                out.append((emitted, float_to_pcm16(last)))
    return info, out


# How far a cut may run past the end of its recording and still be read (the shortfall is dropped):
# Lhotse's own default tolerance (LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE).
CUT_END_TOLERANCE_S = 0.025


def read_cut_audio(audio: str | bytes, start: float, duration: float, channels: Optional[list[int]] = None,
                   *, target_rate: int = 16000) -> tuple[SourceAudioInfo, np.ndarray]:
    """One range of a recording as 16 kHz mono int16: ``duration`` seconds from ``start``, the channel
    positions ``channels`` averaged (None: all channels), resampled to ``target_rate``.

    ``audio`` is a local path (only the range is read: soundfile seeks) or the encoded bytes. Raises
    :class:`AudioDecodeError` for an unreadable recording, a start past its end, a range running more
    than :data:`CUT_END_TOLERANCE_S` past it, a channel the file lacks, or non-finite samples.

    >>> x = np.sin(np.arange(32000) / 5).astype(np.float32)[:, None] * [0.5, 0.25]
    >>> buf = io.BytesIO(); sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    >>> info, y = read_cut_audio(buf.getvalue(), 0.5, 1.0, [1])
    >>> info.channels, y.size, int(np.abs(pcm16_to_float(y) - x[8000:24000, 1]).max() * 32768) <= 1
    (2, 16000, True)
    """
    if isinstance(audio, (bytes, bytearray)):
        f = _open(bytes(audio))
    else:
        try:
            f = sf.SoundFile(audio)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise AudioDecodeError(f"unsupported or corrupt audio: {_error_text(exc)}") from None
    with f:
        info = SourceAudioInfo(sample_rate=int(f.samplerate), channels=int(f.channels), format=str(f.format))
        if info.sample_rate <= 0 or info.channels <= 0:
            raise AudioDecodeError(f"invalid header: {info.sample_rate} Hz, {info.channels} channels")
        total = int(f.frames) if f.frames and f.frames > 0 else None
        first, count = int(round(start * info.sample_rate)), int(round(duration * info.sample_rate))
        length = f"the recording is {total / info.sample_rate:.3f} s" if total is not None else "the recording is shorter"
        if start < 0 or (total is not None and first >= total):
            raise AudioDecodeError(f"offset past the end: the cut starts at {start:.3f} s, {length}")
        if channels is not None and max(channels, default=0) >= info.channels:
            raise AudioDecodeError(f"the cut asks for channel position {max(channels)}, the file has {info.channels}")
        try:
            f.seek(first)
            x = f.read(count, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioDecodeError(f"corrupt audio in the cut's range: {_error_text(exc)}") from None
    if x.shape[0] == 0:
        raise AudioDecodeError(f"offset past the end: the cut starts at {start:.3f} s, {length}")
    if count - x.shape[0] > CUT_END_TOLERANCE_S * info.sample_rate:
        raise AudioDecodeError(f"the cut ends at {start + duration:.3f} s, past the end of the recording "
                               f"({(first + x.shape[0]) / info.sample_rate:.3f} s)")
    picked = x if channels is None else x[:, channels]
    mono = picked[:, 0] if picked.shape[1] == 1 else picked @ np.full(picked.shape[1], 1.0 / picked.shape[1], np.float32)
    if not np.isfinite(mono).all():
        raise AudioDecodeError(f"non-finite (NaN/inf) samples, first at sample {first + int(np.argmax(~np.isfinite(mono)))}")
    if info.sample_rate != target_rate:
        mono = soxr.resample(mono, info.sample_rate, target_rate, quality="HQ")
    return info, float_to_pcm16(mono)
