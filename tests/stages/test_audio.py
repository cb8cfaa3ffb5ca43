import io

import numpy as np
import pytest
import soundfile as sf
import soxr

from spear.stages.audio import (AudioDecodeError, decode_segments, flac_decode, flac_encode, float_to_pcm16,
                                ogg_page_crc, ogg_pages, with_ogg_serial)

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


CUT_CASES = [("wav", 16000, 1), ("wav", 44100, 2), ("flac", 44100, 2), ("flac", 16000, 1),
             ("vorbis", 44100, 2), ("opus", 48000, 1), ("mp3", 16000, 1), ("mp3", 48000, 2)]


@pytest.mark.parametrize("codec, rate, channels", CUT_CASES)
def test_an_object_cut_half_way_keeps_its_decodable_part(codec, rate, channels):
    whole_bytes = encode(make_signal(rate, channels, 6.4), rate, codec)
    cut = whole_bytes[: len(whole_bytes) // 2]
    with pytest.raises(AudioDecodeError, match="truncated|corrupt audio"):
        decode_segments(cut, max_segment_seconds=2.0)  # strict by default (e.g. evaluation clips)

    info, parts = decode_segments(cut, max_segment_seconds=2.0, keep_partial=True)
    assert info.partial and ("truncated" in info.partial or "corrupt audio" in info.partial), info.partial
    kept = np.concatenate([p for _, p in parts])
    assert [o for o, _ in parts] == list(np.cumsum([0] + [p.size for _, p in parts[:-1]]))
    assert all(p.size <= 2 * 16000 for _, p in parts)
    # About half of it, give or take the codec's framing (Ogg pages hold up to a few seconds here).
    assert 1.0 * 16000 < kept.size <= 3.3 * 16000, kept.size
    if codec == "vorbis" or codec == "opus":
        assert info.declared_seconds is None  # an Ogg stream does not say how long it was meant to be
    else:
        assert info.declared_seconds == pytest.approx(6.4, abs=0.01)
    if codec in LOSSLESS:
        # the kept samples are the whole object's, but for the resampler's flush at the new end
        _, whole = decode_segments(whole_bytes, max_segment_seconds=2.0)
        full = np.concatenate([p for _, p in whole])
        n = kept.size - 1000
        assert np.array_equal(kept[:n], full[:n])


def test_nothing_decodable_before_the_cut_is_still_an_error():
    data = encode(make_signal(44100, 2, 3.0), 44100, "flac")[:3000]
    with pytest.raises(AudioDecodeError, match="corrupt audio|truncated"):
        decode_segments(data, keep_partial=True)


def test_the_decode_stage_keeps_a_partial_object_and_notes_it():
    from spear.config import DecodeConfig
    from spear.schemas.quarantine import is_partial
    from spear.stages.decode import _empty_columns, decode_object

    obj = {"uri": "/x/cut.flac", "source": "s", "relative_path": "cut.flac", "etag": "e", "size": 1,
           "domain": "speech"}
    data = encode(make_signal(44100, 1, 6.4), 44100, "flac")
    data = data[: len(data) // 2]
    cols = _empty_columns()
    decode_object(obj, data, DecodeConfig(max_segment_seconds=2.0, min_segment_seconds=0.5), cols)
    rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    notes = [r for r in rows if r["quarantine_reason"] is not None]
    segs = [r for r in rows if r["quarantine_reason"] is None]
    assert len(notes) == 1 and is_partial({"stage": notes[0]["quarantine_stage"], "reason": notes[0]["quarantine_reason"]})
    kept = sum(r["num_samples"] for r in segs) / 16000
    assert notes[0]["quarantine_reason"].startswith(f"partial: kept {kept:.1f} s of ~6.4 s: corrupt audio")
    # every kept segment says how many the object has, so writers can tell when it is complete
    assert {r["object_segments"] for r in segs} == {len(segs)} and len(segs) == 2

    cols = _empty_columns()  # a kept part shorter than min_segment_seconds: the whole object is quarantined
    decode_object(obj, data, DecodeConfig(max_segment_seconds=30.0, min_segment_seconds=5.0), cols)
    assert cols["segment_id"] == [""] and "shorter than min_segment_seconds=5.0" in cols["quarantine_reason"][0]
    assert "corrupt audio" in cols["quarantine_reason"][0] and not is_partial(
        {"stage": "decode", "reason": cols["quarantine_reason"][0]})


def test_bytes_after_a_whole_ogg_stream_are_not_a_cut():
    data = encode(make_signal(44100, 2, 2.0), 44100, "vorbis") + b"TAG" + bytes(125)
    info, parts = decode_segments(data, keep_partial=True)
    assert info.partial is None and sum(p.size for _, p in parts) == pytest.approx(32000, abs=160)


@pytest.mark.parametrize("codec, rate", [("vorbis", 22050), ("opus", 48000)])
def test_a_set_ogg_serial_keeps_the_audio_and_every_page_checksum_valid(codec, rate):
    """libogg drops a page whose checksum is wrong, so a decode of the same length and samples shows the
    rewritten checksums are right; the original pages' checksums check the CRC itself."""
    data = encode(make_signal(rate, 2, 3.0), rate, codec)
    pages = list(ogg_pages(data))
    assert len(pages) > 3 and None not in pages and pages[-1].end_of_stream and pages[-1].end == len(data)
    assert all(ogg_page_crc(data[p.start:p.end]) == int.from_bytes(data[p.start + 22:p.start + 26], "little")
               for p in pages)
    fixed = with_ogg_serial(data, 0xC0FFEE)
    assert len(fixed) == len(data) and fixed != data
    assert {fixed[p.start + 14:p.start + 18] for p in pages} == {(0xC0FFEE).to_bytes(4, "little")}
    assert np.array_equal(sf.read(io.BytesIO(fixed))[0], sf.read(io.BytesIO(data))[0])
    assert with_ogg_serial(encode(make_signal(rate, 2, 3.0), rate, codec), 0xC0FFEE) == fixed  # same audio, same bytes
    with pytest.raises(ValueError, match="end inside a page"):
        with_ogg_serial(data[:-10], 1)
