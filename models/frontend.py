"""Kaldi-compatible filterbank and MFCC features in pure torch, batched over padded waveforms.

The same numbers as Kaldi's ``compute-fbank-feats`` / ``compute-mfcc-feats`` with
``--dither=0 --snip-edges=true`` (25 ms povey window, 10 ms shift, DC removal,
pre-emphasis 0.97, FFT padded to 512, power spectrum, Kaldi's triangular mel banks,
log with a FLT_EPSILON floor; MFCC: DCT-II, cepstral lifter 22, log energy in c0),
computed for a whole batch at once. Frames are cut with ``snip_edges`` semantics, so
every valid frame of an utterance only sees that utterance's samples: zero padding
(or anything else) after ``lengths[b]`` never changes them. Frames past an utterance's
end are returned as zeros.

Kaldi reads int16 samples; these modules take whatever scale they are given (the
pipeline passes float waveforms in [-1, 1), like Lhotse and icefall). Multiply by 32768
to reproduce Kaldi's numbers on int16 files: log features then differ by a constant.
Dither is fixed at 0 so features are deterministic.

Example::

    >>> import torch
    >>> from spear.models.frontend import KaldiFbank, KaldiMfcc
    >>> wavs = torch.randn(2, 16000) * 0.1
    >>> lengths = torch.tensor([16000, 8000])
    >>> feats, num_frames = KaldiFbank(num_mel_bins=128)(wavs, lengths)
    >>> feats.shape, num_frames.tolist()
    (torch.Size([2, 98, 128]), [98, 48])
    >>> KaldiMfcc()(wavs, lengths)[0].shape
    torch.Size([2, 98, 13])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FLT_EPSILON = float(torch.finfo(torch.float32).eps)  # Kaldi's std::numeric_limits<float>::epsilon()


def kaldi_mel_scale(freq):
    """Kaldi's mel scale: 1127 ln(1 + f / 700) (works on floats and tensors)."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@dataclass(frozen=True)
class FrameOptions:
    """Kaldi's frame extraction options (``FrameExtractionOptions``) with dither 0 and snip_edges true."""

    sample_rate: int = 16000
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True
    window_type: str = "povey"  # povey | hanning | hamming | rectangular
    round_to_power_of_two: bool = True

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_length_ms)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_shift_ms)

    @property
    def padded_window_size(self) -> int:
        n = self.window_size
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n


def num_frames(num_samples, window_size: int = 400, window_shift: int = 160):
    """Frames Kaldi cuts with snip_edges=true: 1 + (n - window) // shift, 0 when n < window.

    Works on ints and integer tensors.
    """
    if isinstance(num_samples, torch.Tensor):
        n = num_samples.to(torch.long)
        return torch.where(n >= window_size, (n - window_size) // window_shift + 1, torch.zeros_like(n))
    return (num_samples - window_size) // window_shift + 1 if num_samples >= window_size else 0


def frame_window(window_type: str, size: int) -> torch.Tensor:
    """Kaldi's window functions (``FeatureWindowFunction``), float64."""
    n = torch.arange(size, dtype=torch.float64)
    a = 2 * math.pi / (size - 1)
    if window_type == "povey":  # a Hann window raised to 0.85: like Hamming but goes to zero at the edges
        return (0.5 - 0.5 * torch.cos(a * n)).pow(0.85)
    if window_type == "hanning":
        return 0.5 - 0.5 * torch.cos(a * n)
    if window_type == "hamming":
        return 0.54 - 0.46 * torch.cos(a * n)
    if window_type == "rectangular":
        return torch.ones(size, dtype=torch.float64)
    raise ValueError(f"unknown window_type {window_type!r}: use povey, hanning, hamming or rectangular")


def kaldi_mel_banks(num_bins: int, padded_window_size: int, sample_rate: int,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filterbank (``MelBanks``, no VTLN) as a [padded/2 + 1, num_bins] matrix.

    ``high_freq <= 0`` is an offset from Nyquist, as in Kaldi. The Nyquist row is zero:
    Kaldi's banks cover FFT bins 0 .. padded/2 - 1 only.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel band: low_freq {low_freq}, high_freq {high_freq}, nyquist {nyquist}")
    if num_bins < 3:
        raise ValueError("need at least 3 mel bins")
    num_fft_bins = padded_window_size // 2
    fft_bin_width = sample_rate / padded_window_size
    mel_low, mel_high = kaldi_mel_scale(low_freq), kaldi_mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = kaldi_mel_scale(fft_bin_width * torch.arange(num_fft_bins, dtype=torch.float64)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [num_bins, num_fft_bins]
    return torch.cat([banks, torch.zeros(num_bins, 1, dtype=torch.float64)], dim=1).T.contiguous()


def kaldi_dct_matrix(num_ceps: int, num_bins: int) -> torch.Tensor:
    """Kaldi's orthonormal DCT-II (``ComputeDctMatrix``), first ``num_ceps`` rows, as [num_bins, num_ceps]."""
    n = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(num_ceps, dtype=torch.float64).unsqueeze(0)
    dct = torch.cos(math.pi / num_bins * (n + 0.5) * k) * math.sqrt(2.0 / num_bins)
    dct[:, 0] = math.sqrt(1.0 / num_bins)
    return dct


def kaldi_lifter(num_ceps: int, cepstral_lifter: float) -> torch.Tensor:
    """1 + Q/2 sin(pi i / Q), Kaldi's ``ComputeLifterCoeffs``."""
    i = torch.arange(num_ceps, dtype=torch.float64)
    if cepstral_lifter == 0:
        return torch.ones(num_ceps, dtype=torch.float64)
    return 1.0 + 0.5 * cepstral_lifter * torch.sin(math.pi * i / cepstral_lifter)


def frame_mask(num_frames_: torch.Tensor, max_frames: int) -> torch.Tensor:
    """[B, T] bool, True on each utterance's valid frames."""
    return torch.arange(max_frames, device=num_frames_.device).unsqueeze(0) < num_frames_.unsqueeze(1)


class _KaldiBase(nn.Module):
    """Frame extraction and the power spectrum shared by fbank and MFCC."""

    def __init__(self, frame_opts: FrameOptions):
        super().__init__()
        self.frame_opts = frame_opts
        self.register_buffer("window", frame_window(frame_opts.window_type, frame_opts.window_size).float(),
                             persistent=False)

    def num_frames(self, num_samples):
        return num_frames(num_samples, self.frame_opts.window_size, self.frame_opts.window_shift)

    def _frames(self, wavs: torch.Tensor, lengths: torch.Tensor | None, with_energy: bool = False):
        """-> (power spectrum [B, T, padded/2+1], raw log energy [B, T] or None, num_frames [B])."""
        if wavs.dim() != 2:
            raise ValueError(f"expected waveforms [B, S], got shape {tuple(wavs.shape)}")
        o = self.frame_opts
        B, S = wavs.shape
        if lengths is None:
            lengths = torch.full((B,), S, dtype=torch.long)
        lengths = lengths.to(device=wavs.device, dtype=torch.long)
        if bool((lengths > S).any()):
            raise ValueError(f"a length exceeds the padded width {S}")
        nf = self.num_frames(lengths)
        T = int(nf.max()) if B else 0
        x = wavs.float()
        if T == 0:
            bins = o.padded_window_size // 2 + 1
            return x.new_zeros(B, 0, bins), x.new_zeros(B, 0) if with_energy else None, nf
        # [B, T, window]: frame t starts at t * shift; with snip_edges a valid frame ends inside the utterance.
        frames = x[:, : (T - 1) * o.window_shift + o.window_size].unfold(1, o.window_size, o.window_shift)
        if o.remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        # Raw energy (Kaldi's default raw_energy=true): after DC removal, before pre-emphasis and window.
        log_energy = frames.pow(2).sum(-1).clamp_min(FLT_EPSILON).log() if with_energy else None
        c = o.preemph_coeff
        y = frames.clone(memory_format=torch.contiguous_format)
        if c != 0.0:  # in place on a copy; `frames` still holds the unshifted samples
            y[..., 1:].sub_(frames[..., :-1], alpha=c)
            y[..., 0].mul_(1.0 - c)  # Kaldi: x[0] -= c * x[0]
        y.mul_(self.window)
        spec = torch.fft.rfft(y, n=o.padded_window_size, dim=-1)
        power = spec.real.square() + spec.imag.square()
        return power, log_energy, nf


class KaldiFbank(_KaldiBase):
    """Log mel filterbank energies as Kaldi's ``compute-fbank-feats`` (use_energy=false, dither 0).

    ``forward(wavs [B, S], lengths [B]) -> (feats [B, T, num_mel_bins], num_frames [B])``, float32,
    zeros past each utterance's frames.
    """

    def __init__(self, num_mel_bins: int = 128, low_freq: float = 20.0, high_freq: float = 0.0,
                 frame_opts: FrameOptions = FrameOptions()):
        super().__init__(frame_opts)
        self.num_mel_bins = num_mel_bins
        self.low_freq, self.high_freq = low_freq, high_freq
        self.register_buffer("mel_banks", kaldi_mel_banks(num_mel_bins, frame_opts.padded_window_size,
                                                          frame_opts.sample_rate, low_freq, high_freq).float(),
                             persistent=False)

    def settings(self) -> dict:
        """Everything that determines the output (for version ids)."""
        return {"type": "kaldi_fbank", "num_mel_bins": self.num_mel_bins, "low_freq": self.low_freq,
                "high_freq": self.high_freq, **self.frame_opts.__dict__}

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(wavs.device.type, enabled=False):  # logs of small energies need float32
            power, _, nf = self._frames(wavs, lengths)
            feats = (power @ self.mel_banks).clamp_min(FLT_EPSILON).log()
            return feats * frame_mask(nf, feats.shape[1]).unsqueeze(-1), nf


class KaldiMfcc(_KaldiBase):
    """MFCCs as Kaldi's ``compute-mfcc-feats`` (defaults: 23 mel bins, 13 ceps, lifter 22, use_energy, dither 0).

    ``forward(wavs [B, S], lengths [B]) -> (feats [B, T, num_ceps], num_frames [B])``. With
    ``use_energy`` the raw log energy of each frame replaces c0 (``energy_floor > 0`` floors it
    at ``log(energy_floor)``, as Kaldi).
    """

    def __init__(self, num_ceps: int = 13, num_mel_bins: int = 23, cepstral_lifter: float = 22.0,
                 use_energy: bool = True, energy_floor: float = 0.0, low_freq: float = 20.0,
                 high_freq: float = 0.0, frame_opts: FrameOptions = FrameOptions()):
        super().__init__(frame_opts)
        if num_ceps > num_mel_bins:
            raise ValueError(f"num_ceps ({num_ceps}) cannot exceed num_mel_bins ({num_mel_bins})")
        self.num_ceps, self.num_mel_bins, self.cepstral_lifter = num_ceps, num_mel_bins, cepstral_lifter
        self.use_energy, self.energy_floor = use_energy, energy_floor
        self.low_freq, self.high_freq = low_freq, high_freq
        self.register_buffer("mel_banks", kaldi_mel_banks(num_mel_bins, frame_opts.padded_window_size,
                                                          frame_opts.sample_rate, low_freq, high_freq).float(),
                             persistent=False)
        # DCT and lifter folded into one matrix: both are linear maps of the log mel energies.
        dct = kaldi_dct_matrix(num_ceps, num_mel_bins) * kaldi_lifter(num_ceps, cepstral_lifter).unsqueeze(0)
        self.register_buffer("dct", dct.float(), persistent=False)

    def settings(self) -> dict:
        return {"type": "kaldi_mfcc", "num_ceps": self.num_ceps, "num_mel_bins": self.num_mel_bins,
                "cepstral_lifter": self.cepstral_lifter, "use_energy": self.use_energy,
                "energy_floor": self.energy_floor, "low_freq": self.low_freq, "high_freq": self.high_freq,
                **self.frame_opts.__dict__}

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(wavs.device.type, enabled=False):
            power, log_energy, nf = self._frames(wavs, lengths, with_energy=self.use_energy)
            log_mel = (power @ self.mel_banks).clamp_min(FLT_EPSILON).log()
            feats = log_mel @ self.dct
            if self.use_energy:
                if self.energy_floor > 0.0:
                    log_energy = log_energy.clamp_min(math.log(self.energy_floor))
                feats = torch.cat([log_energy.unsqueeze(-1), feats[..., 1:]], dim=-1)
            return feats * frame_mask(nf, feats.shape[1]).unsqueeze(-1), nf


def kaldi_delta_filters(order: int = 2, window: int = 2) -> list[torch.Tensor]:
    """Kaldi's ``DeltaFeatures`` scales: filter i is filter i-1 convolved with [-w..w] / sum(j^2)."""
    filters = [torch.ones(1, dtype=torch.float64)]
    taps = torch.arange(-window, window + 1, dtype=torch.float64)
    norm = float((taps ** 2).sum())
    for _ in range(order):
        prev = filters[-1]
        cur = torch.zeros(prev.numel() + 2 * window, dtype=torch.float64)
        for j, t in enumerate(taps.tolist()):
            cur[j: j + prev.numel()] += t * prev
        filters.append(cur / norm)
    return filters


def add_deltas(feats: torch.Tensor, num_frames_: torch.Tensor, order: int = 2, window: int = 2) -> torch.Tensor:
    """Kaldi's ``add-deltas``: [B, T, D] -> [B, T, D * (order + 1)].

    Each order is computed from the original features with Kaldi's composed filter, and frame
    indices are clamped to each utterance's own first and last valid frame, so padding never
    enters the deltas.
    """
    B, T, D = feats.shape
    if T == 0:
        return feats.new_zeros(B, 0, D * (order + 1))
    filters = kaldi_delta_filters(order, window)[1:]
    half = (filters[-1].numel() - 1) // 2
    # One gather pads every utterance with copies of its own edge frames, then one depthwise conv.
    last = (num_frames_.to(feats.device).clamp_min(1) - 1).view(B, 1)
    idx = torch.minimum((torch.arange(T + 2 * half, device=feats.device).view(1, -1) - half).clamp_min(0), last)
    padded = torch.gather(feats, 1, idx.unsqueeze(-1).expand(B, idx.shape[1], D))  # [B, T + 2 half, D]
    weight = torch.stack([F.pad(f, (half - (f.numel() - 1) // 2,) * 2) for f in filters]).to(feats)  # [order, 2 half + 1]
    x = padded.transpose(1, 2).reshape(B * D, 1, -1)
    deltas = F.conv1d(x, weight.unsqueeze(1))  # a correlation, as Kaldi's sum_j scale[j] * x[t + j]
    deltas = deltas.view(B, D, order, T).permute(0, 3, 2, 1).reshape(B, T, order * D)
    res = torch.cat([feats, deltas], dim=-1)
    return res * frame_mask(num_frames_.to(feats.device), T).unsqueeze(-1)
