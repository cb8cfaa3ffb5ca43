"""Weight-free teachers: Kaldi MFCC for speech, log-mel fbank for general audio.

They are the embedded default (no checkpoint to download) and the first iteration of
HuBERT-style training: the student learns to predict MVQ tokens of these features, and
a trained student becomes the next teacher.

- ``mfcc`` (speech, 50 Hz, 78-d): Kaldi MFCC (23 mel bins, 13 ceps with log energy as
  c0, lifter 22) at 100 Hz plus Kaldi ``add-deltas`` (order 2, window 2) = 39-d, as
  HuBERT's first iteration; pairs of consecutive 100 Hz frames are stacked into one
  50 Hz frame (78-d) so no information is averaged away. An odd last frame is paired
  with itself. Frame count = ceil(T100 / 2) = (S - 400) // 320 + 1, exactly WavLM's and
  HuBERT's count for the same audio, so speech teachers are interchangeable.
- ``fbank`` (audio, 25 Hz, 128-d): 128-bin Kaldi log-mel fbank at 100 Hz, averaged over
  groups of 4 frames (40 ms, Dasheng's patch hop); the last, partial group averages the
  frames it has. Frame count = ceil(T100 / 4).

Example::

    >>> import torch
    >>> from spear.models.teachers.features import MfccTeacher
    >>> t = MfccTeacher()
    >>> t.num_frames_for(16000), t.dim, t.frame_rate
    (49, 78, 50.0)
"""

from __future__ import annotations

import torch

from ..frontend import KaldiFbank, KaldiMfcc, add_deltas, frame_mask
from .base import Teacher, make_version


def _ceil_div(n, d: int):
    return -(-n // d)


class MfccTeacher(Teacher):
    """39-d Kaldi MFCC + deltas at 100 Hz, pairs stacked: 78-d at 50 Hz."""

    name = "mfcc"
    frame_rate = 50.0
    stack = 2

    def __init__(self) -> None:
        super().__init__()
        self.mfcc = KaldiMfcc(num_ceps=13, num_mel_bins=23, cepstral_lifter=22.0, use_energy=True)
        self.delta_order, self.delta_window = 2, 2
        self.dim = 13 * (self.delta_order + 1) * self.stack
        settings = {"frontend": self.mfcc.settings(), "deltas": [self.delta_order, self.delta_window], "stack": self.stack}
        self.version = make_version(self.name, None, None, settings)

    def num_frames_for(self, num_samples):
        return _ceil_div(self.mfcc.num_frames(num_samples), self.stack)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feats, nf = self.mfcc(wavs, lengths)
        feats = add_deltas(feats, nf, self.delta_order, self.delta_window)  # [B, T100, 39]
        B, T, D = feats.shape
        T50 = _ceil_div(T, self.stack)
        # Pair frame 2t with 2t+1; an utterance's odd last frame pairs with itself (index clamped).
        t = torch.arange(T50 * self.stack, device=feats.device).view(1, -1)
        idx = torch.minimum(t, (nf.clamp_min(1) - 1).view(B, 1))
        stacked = torch.gather(feats, 1, idx.unsqueeze(-1).expand(B, idx.shape[1], D))
        return stacked.reshape(B, T50, self.stack * D)


class FbankTeacher(Teacher):
    """128-bin Kaldi log-mel at 100 Hz averaged over groups of 4 frames: 128-d at 25 Hz."""

    name = "fbank"
    frame_rate = 25.0
    pool = 4

    def __init__(self, num_mel_bins: int = 128) -> None:
        super().__init__()
        self.fbank = KaldiFbank(num_mel_bins=num_mel_bins)
        self.dim = num_mel_bins
        self.version = make_version(self.name, None, None, {"frontend": self.fbank.settings(), "pool": self.pool})

    def num_frames_for(self, num_samples):
        return _ceil_div(self.fbank.num_frames(num_samples), self.pool)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feats, nf = self.fbank(wavs, lengths)  # zeros past each utterance's frames
        B, T, D = feats.shape
        T25 = _ceil_div(T, self.pool)
        feats = torch.nn.functional.pad(feats, (0, 0, 0, T25 * self.pool - T))
        sums = feats.view(B, T25, self.pool, D).sum(2)
        valid = frame_mask(nf, T25 * self.pool).view(B, T25, self.pool).sum(2).clamp_min(1)
        return sums / valid.unsqueeze(-1)
