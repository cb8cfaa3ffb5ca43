"""wav2vec2-style span masking and channel masking of fbank features (SPEAR's masking).

SPEAR masks *fbank frames* (100 Hz) before the student's subsampling: spans of
``mask_length`` frames, each frame a span start with probability about ``mask_prob /
mask_length`` (fairseq's ``compute_mask_indices``), so with overlap ~ 1 - exp(-0.65) ≈ 48%
of the frames end up masked at the defaults (0.65, 10). Masked frames are later replaced by
the encoder's learned mask embedding (``StudentEncoder.forward(mask=...)``). Channel
masking sets whole mel bins of an utterance to 0 (spans of ``channel_mask_length`` bins).

Span masking follows fairseq's ``compute_mask_indices`` (mask_type "static", overlap allowed,
``num_mask_ver=2``), per utterance of valid length L:

- ``num_spans = max(min_masks, int(mask_prob * L / mask_length + u))``, u ~ U[0, 1)
  (probabilistic rounding);
- span starts: ``num_spans`` distinct positions drawn uniformly from ``[0, L - mask_length)``
  (from ``[0, L - num_spans - 1)`` when that is too short, as fairseq);
- each span covers ``mask_length`` frames, clipped at L; padding is never masked.

Differences from fairseq: no ``require_same_masks`` (fairseq trims every utterance of a
batch to the smallest mask count, which ties an utterance's masking to its batch mates);
an utterance the spans would cover entirely keeps its last frame unmasked instead of raising. Everything runs in torch with a
``torch.Generator``, vectorised over the batch.

Example::

    >>> import torch
    >>> from spear.models.student.masking import span_mask, channel_mask
    >>> g = torch.Generator().manual_seed(0)
    >>> m = span_mask(torch.tensor([500, 300]), 500, generator=g)
    >>> m.shape, bool(m[1, 300:].any())
    (torch.Size([2, 500]), False)
    >>> channel_mask(2, 128, generator=g).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _rand(shape, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device)


def span_mask(lengths: torch.Tensor, max_len: int, mask_prob: float = 0.65, mask_length: int = 10,
              min_masks: int = 2, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, max_len] bool span mask (True = masked) for utterances of ``lengths`` frames.

    See the module docstring for the exact semantics. An utterance of L frames never gets
    more than L - 1 frames masked (fairseq raises instead); L <= 1 gets none.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    B = lengths.numel()
    if mask_prob <= 0 or B == 0 or max_len == 0:
        return torch.zeros(B, max_len, dtype=torch.bool)
    L = lengths.clamp(max=max_len)
    num = (mask_prob * L.double() / mask_length + _rand(B, generator).cpu().double()).long()
    num = torch.maximum(num, torch.full_like(num, min_masks))
    # Start positions are drawn from [0, L - span): fairseq's idc_select_ver 1, with its fallback
    # for utterances shorter than spans + starts.
    span = torch.full_like(L, mask_length)
    short = L - span <= num
    span = torch.where(short, L - num - 1, span)
    n_starts = (L - span).clamp_min(0)
    num = torch.minimum(num, n_starts)  # cannot choose more distinct starts than positions
    # Distinct uniform starts: rank random keys among the allowed positions, keep the num lowest.
    keys = _rand((B, max_len), generator).cpu()
    pos = torch.arange(max_len).unsqueeze(0)
    keys = keys.masked_fill(pos >= n_starts.unsqueeze(1), 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    starts = rank < num.unsqueeze(1)
    # Frame t is masked if a span starts in (t - mask_length, t]: a windowed count via cumsum.
    c = torch.cumsum(starts.long(), dim=1)
    shifted = torch.nn.functional.pad(c, (mask_length, 0))[:, :max_len]
    mask = (c - shifted) > 0
    mask &= pos < L.unsqueeze(1)
    # Never mask a whole utterance (an input with no visible frame teaches nothing).
    full = mask.sum(1) >= L
    if bool((full & (L > 0)).any()):
        last = (L - 1).clamp_min(0)
        mask[full.nonzero().flatten(), last[full]] = False
    return mask


def channel_mask(batch_size: int, num_channels: int, mask_prob: float = 0.25, mask_length: int = 20,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, num_channels] bool: mel bins masked for every frame of an utterance (fairseq, min_masks 0)."""
    return span_mask(torch.full((batch_size,), num_channels), num_channels, mask_prob, mask_length,
                     min_masks=0, generator=generator)


@dataclass
class MaskedFeatures:
    """``feats`` with the channel mask applied (masked bins = 0), the frame mask for the encoder
    (``StudentEncoder.forward(feats, lengths, mask=frame_mask)``) and the channel mask."""

    feats: torch.Tensor
    frame_mask: torch.Tensor
    channel_mask: torch.Tensor


def mask_features(feats: torch.Tensor, lengths: torch.Tensor, *, mask_prob: float = 0.65, mask_length: int = 10,
                  min_masks: int = 2, channel_mask_prob: float = 0.25, channel_mask_length: int = 20,
                  generator: Optional[torch.Generator] = None) -> MaskedFeatures:
    """Draw span and channel masks for fbank ``feats`` [B, T, F] and apply the channel mask.

    The settings are those of :func:`span_mask` (``mask_prob``, ``mask_length``, ``min_masks``)
    and :func:`channel_mask` (``channel_mask_prob``, ``channel_mask_length``); the defaults are
    SPEAR's (the fields of ``spear.config.MaskingConfig``, which the train stage passes on).
    The span mask is returned, not applied: the encoder replaces those frames with its learned
    embedding (which then covers the masked channels too).

    >>> import torch
    >>> from spear.models.student.masking import mask_features
    >>> out = mask_features(torch.randn(2, 400, 80), torch.tensor([400, 250]), generator=torch.Generator().manual_seed(1))
    >>> out.frame_mask.shape, out.channel_mask.shape
    (torch.Size([2, 400]), torch.Size([2, 80]))
    """
    B, T, C = feats.shape
    frames = span_mask(lengths, T, mask_prob, mask_length, min_masks, generator).to(feats.device)
    channels = channel_mask(B, C, channel_mask_prob, channel_mask_length, generator).to(feats.device)
    if bool(channels.any()):
        feats = feats.masked_fill(channels.unsqueeze(1), 0.0)
    return MaskedFeatures(feats, frames, channels)
