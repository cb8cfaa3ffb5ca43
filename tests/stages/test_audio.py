import io

import numpy as np
import pytest
import soundfile as sf
import soxr

from spear.stages.audio import AudioDecodeError, decode_segments, flac_decode, flac_encode, float_to_pcm16

from support.audio_files import LOSSLESS, combos, encode, expected_mono, make_signal


def _snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - est) ** 2), 1e-20)))


def _best_lag_snr(ref: np.ndarray, est: np.ndarray, max_lag: int = 1200) -> tuple[int, float]:
    """Lossy codecs may shift the signal by their delay: score at the best alignment."""
    n = min(len(ref), len(est)) - 2 * max_lag
    best = (0, -np.inf)
    core = ref[max_lag:max_lag + n]
    for lag in range(-max_lag, max_lag + 1, 1):
        s = _snr_db(core, est[max_lag + lag:max_lag + lag + n])
        if s > best[1]:
            best = (lag, s)
    return best


@pytest.mark.parametrize("codec, rate, channels", list(combos()))
def test_every_format_rate_and_channel_count_decodes_to_the_signal(codec, rate, channels):
    seconds = 2.5
    data = encode(make_signal(rate, channels, seconds), rate, codec)
    info, segments = decode_segments(data, max_segment_seconds=30)
    assert info.sample_rate == rate and info.channels == channels
    assert len(segments) == 1 and segments[0][0] == 0
    y = segments[0][1].astype(np.float64) / 32768
    assert abs(len(y) - seconds * 16000) <= (2 if codec in LOSSLESS else 0.1 * 16000)
    ref = expected_mono(16000, channels, len(y))
    edge = 160  # resampler edge effects in the first/last 10 ms
    if codec in LOSSLESS:
        # exact up to 16-bit quantisation and the resampler's stop band
        snr = _snr_db(ref[edge:-edge], y[edge:-edge])
        assert snr > (70 if rate == 16000 else 55), snr
    else:
        lag, snr = _best_lag_snr(ref, y)
        assert snr > 12, (lag, snr)


def test_segmentation_covers_every_sample_exactly_once():
    rate, seconds = 44100, 7.3
    data = encode(make_signal(rate, 2, seconds), rate, "flac")
    _, whole = decode_segments(data, max_segment_seconds=600)
    _, parts = decode_segments(data, max_segment_seconds=2.0)
    offsets = [o for o, _ in parts]
    assert offsets == [0, 32000, 64000, 96000]
    assert all(len(p) == 32000 for _, p in parts[:-1])
    joined = np.concatenate([p for _, p in parts])
    assert np.array_equal(joined, whole[0][1])
    # and the streamed resampling has the one-shot length
    mono = make_signal(rate, 2, seconds).mean(axis=1)
    assert abs(len(joined) - len(soxr.resample(mono, rate, 16000))) <= 1


def test_min_segment_drops_only_a_short_tail():
    data = encode(make_signal(16000, 1, 5.2), 16000, "wav")
    _, parts = decode_segments(data, max_segment_seconds=1.0, min_segment_seconds=0.5)
    assert [o for o, _ in parts] == [0, 16000, 32000, 48000, 64000]


def test_flac_round_trip_is_lossless():
    x = make_signal(16000, 1, 1.0)[:, 0]
    pcm = float_to_pcm16(x)
    assert np.array_equal(float_to_pcm16(flac_decode(flac_encode(pcm))), pcm)


def _wav(x, rate=16000, subtype="PCM_16"):
    b = io.BytesIO()
    sf.write(b, x, rate, format="WAV", subtype=subtype)
    return b.getvalue()


@pytest.mark.parametrize("make, reason", [
    (lambda: b"", "empty object"),
    (lambda: b"this is not audio at all" * 50, "unsupported or corrupt audio"),
    (lambda: encode(make_signal(44100, 2, 3.0), 44100, "flac")[:20000], "corrupt audio"),
    (lambda: _wav(make_signal(16000, 1, 3.0))[:30000], "truncated"),
    (lambda: _wav(np.zeros((0, 1), np.float32)), "zero-length audio"),
    (lambda: _wav(np.where(np.arange(16000)[:, None] == 777, np.nan, 0.1).astype(np.float32), subtype="FLOAT"),
     "non-finite"),
])
def test_bad_audio_is_rejected_with_its_reason(make, reason):
    with pytest.raises(AudioDecodeError, match=reason):
        decode_segments(make())
