"""Kaldi-compatible fbank / MFCC: against an independent float64 reimplementation of Kaldi's
formulas, against lhotse's torch port, padding invariance and frame counts."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from spear.models.frontend import FLT_EPSILON, KaldiFbank, KaldiMfcc, add_deltas, num_frames


def _speechlike(n: int, seed: int) -> np.ndarray:
    """A few harmonics with a wandering pitch plus noise: energy in every band, no silent frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.2 + rng.normal(0, 0.02, n)
    return x.astype(np.float32)


def _kaldi_reference(x: np.ndarray, num_bins: int, num_ceps: int | None, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's feature-window.cc / mel-computations.cc / feature-mfcc.cc, frame by frame, float64, plain loops."""
    x = x.astype(np.float64)
    N, shift, padded = 400, 160, 512
    win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N) / (N - 1))) ** 0.85
    nyq = 8000.0
    hi = high_freq + nyq if high_freq <= 0 else high_freq
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo_m, hi_m = mel(20.0), mel(hi)
    d = (hi_m - lo_m) / (num_bins + 1)
    banks = np.zeros((num_bins, padded // 2))
    for b in range(num_bins):
        left, center, right = lo_m + b * d, lo_m + (b + 1) * d, lo_m + (b + 2) * d
        for i in range(padded // 2):
            m = mel(16000 / padded * i)
            if left < m < right:
                banks[b, i] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)
    out = []
    for f in range(1 + (len(x) - N) // shift):
        w = x[f * shift: f * shift + N].copy()
        w -= w.mean()
        log_energy = math.log(max(float(w @ w), FLT_EPSILON))
        for i in range(N - 1, 0, -1):
            w[i] -= 0.97 * w[i - 1]
        w[0] -= 0.97 * w[0]
        spec = np.abs(np.fft.rfft(np.concatenate([w * win, np.zeros(padded - N)]))) ** 2
        logmel = np.log(np.maximum(banks @ spec[: padded // 2], FLT_EPSILON))
        if num_ceps is None:
            out.append(logmel)
            continue
        c = np.array([sum(logmel[j] * math.cos(math.pi / num_bins * (j + 0.5) * k) for j in range(num_bins))
                      * math.sqrt((1.0 if k == 0 else 2.0) / num_bins) for k in range(num_ceps)])
        c *= 1 + 11 * np.sin(np.pi * np.arange(num_ceps) / 22)
        c[0] = log_energy
        out.append(c)
    return np.array(out)


@pytest.mark.parametrize("num_bins,high_freq", [(128, 0.0), (80, -400.0)])
def test_fbank_matches_kaldi_formulas(num_bins, high_freq):
    x = _speechlike(4000, seed=1)
    ref = _kaldi_reference(x, num_bins, None, high_freq)
    feats, nf = KaldiFbank(num_mel_bins=num_bins, high_freq=high_freq)(torch.from_numpy(x)[None])
    assert nf.tolist() == [len(ref)] == [23]
    np.testing.assert_allclose(feats[0].numpy(), ref, atol=2e-3, rtol=1e-4)


def test_mfcc_matches_kaldi_formulas():
    x = _speechlike(4000, seed=2)
    ref = _kaldi_reference(x, 23, 13)
    feats, nf = KaldiMfcc()(torch.from_numpy(x)[None])
    assert feats.shape == (1, len(ref), 13)
    np.testing.assert_allclose(feats[0].numpy(), ref, atol=2e-3, rtol=1e-4)


def test_matches_lhotse_kaldi_layers():
    layers = pytest.importorskip("lhotse.features.kaldi.layers", reason="lhotse (test extra) is the third-party reference")
    x = torch.from_numpy(np.stack([_speechlike(16000, 3), _speechlike(16000, 4)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lhotse warns that snip_edges=True is unusual for it
        ref_fb = layers.Wav2LogFilterBank(snip_edges=True, num_filters=128, high_freq=0.0)(x)
        ref_mfcc = layers.Wav2MFCC(snip_edges=True, high_freq=0.0, use_energy=False)(x)
        _, ref_energy = layers.Wav2Win(snip_edges=True, return_log_energy=True)(x)
    fb, _ = KaldiFbank(num_mel_bins=128)(x)
    torch.testing.assert_close(fb, ref_fb, atol=1e-3, rtol=1e-4)
    mfcc, _ = KaldiMfcc(use_energy=False)(x)
    torch.testing.assert_close(mfcc, ref_mfcc, atol=1e-3, rtol=1e-4)
    mfcc_e, _ = KaldiMfcc(use_energy=True)(x)  # lhotse's batched use_energy path is broken; compare c0 alone
    torch.testing.assert_close(mfcc_e[..., 0], ref_energy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(mfcc_e[..., 1:], ref_mfcc[..., 1:], atol=1e-3, rtol=1e-4)


def test_matches_torchaudio_compliance_kaldi():
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi", reason="torchaudio does not import here (GPU machines only)")
    x = torch.from_numpy(_speechlike(12000, 5))[None]
    ref = kaldi.fbank(x, num_mel_bins=128, dither=0.0, snip_edges=True, energy_floor=0.0)
    torch.testing.assert_close(KaldiFbank(num_mel_bins=128)(x)[0][0], ref, atol=1e-3, rtol=1e-4)
    ref = kaldi.mfcc(x, dither=0.0, snip_edges=True, energy_floor=0.0, use_energy=True)
    torch.testing.assert_close(KaldiMfcc()(x)[0][0], ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("module", [KaldiFbank(num_mel_bins=128), KaldiMfcc()], ids=["fbank", "mfcc"])
def test_padding_never_changes_valid_frames(module):
    lengths = [8000, 399, 400, 5321, 0]
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.normal(0, 3, (len(lengths), 9000)).astype(np.float32))  # loud garbage as padding
    singles = []
    for b, n in enumerate(lengths):
        x = torch.from_numpy(_speechlike(n, b))
        batch[b, :n] = x
        singles.append(module(x[None])[0][0])
    feats, nf = module(batch, torch.tensor(lengths))
    assert nf.tolist() == [num_frames(n) for n in lengths] == [48, 0, 1, 31, 0]
    for b, n in enumerate(nf.tolist()):
        torch.testing.assert_close(feats[b, :n], singles[b], atol=1e-5, rtol=1e-5)
        assert bool((feats[b, n:] == 0).all())


def test_num_frames_formula():
    assert [num_frames(n) for n in (0, 399, 400, 559, 560, 16000)] == [0, 0, 1, 1, 2, 98]
    t = num_frames(torch.tensor([0, 399, 400, 16000]))
    assert t.tolist() == [0, 0, 1, 98]


def _kaldi_deltas_reference(feats: np.ndarray) -> np.ndarray:
    """Kaldi's DeltaFeatures (order 2, window 2) for one utterance: composed filters, clamped indices."""
    s1 = np.array([-2, -1, 0, 1, 2]) / 10.0
    s2 = np.convolve(s1, s1)
    T = len(feats)
    out = [feats]
    for s in (s1, s2):
        h = (len(s) - 1) // 2
        out.append(np.stack([sum(s[j + h] * feats[min(max(t + j, 0), T - 1)] for j in range(-h, h + 1))
                             for t in range(T)]))
    return np.concatenate(out, axis=1)


def test_add_deltas_matches_kaldi_and_ignores_padding():
    rng = np.random.default_rng(1)
    lengths = [7, 3, 1]
    feats = torch.from_numpy(rng.normal(size=(3, 7, 4)))
    feats[1, 3:] = 1e6  # padding must not enter any delta
    out = add_deltas(feats, torch.tensor(lengths))
    assert out.shape == (3, 7, 12)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b, :n].numpy(), _kaldi_deltas_reference(feats[b, :n].numpy()), atol=1e-12)
        assert bool((out[b, n:] == 0).all())
