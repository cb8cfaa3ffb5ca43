"""The interface every student encoder implements (:class:`StudentEncoder`), its output type
and the length helpers the architectures share.

The architectures (:mod:`.zipformer`, :mod:`.transformer`) subclass :class:`StudentEncoder`;
:mod:`.encoder` builds them from presets. See :mod:`.encoder` for the contract.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .configs import EncoderConfig

INPUT_FRAME_RATE = 100.0  # fbank frames per second (25 ms window, 10 ms shift)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True on each utterance's valid frames."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def conv_output_length(lengths: torch.Tensor, kernel: int, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Frames out of one convolution along time: (L + 2p - k) // s + 1, never below 0."""
    out = torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1
    return out.clamp_min(0)


@dataclass
class EncoderOutput:
    """``frames`` [B, T', D] (zeros past ``lengths``), ``lengths`` [B] int64, and with
    ``return_layers`` the output of every layer, each [B, T', D_layer], at the output frame rate."""

    frames: torch.Tensor
    lengths: torch.Tensor
    layers: Optional[list[torch.Tensor]] = field(default=None)


class StudentEncoder(nn.Module):
    """Base class: input checks, the learned mask embedding, output masking, frame-mask mapping.

    Subclasses set ``config``, ``frame_rate``, ``subsampling`` (input frames per output frame),
    ``receptive_field`` (input frames one output frame of the conv subsampling sees) and
    ``layer_dims``, and implement :meth:`output_lengths` and :meth:`encode`.
    """

    input_frame_rate: float = INPUT_FRAME_RATE
    min_input_frames: int = 1

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.num_mel_bins = config.num_mel_bins
        # Replaces masked fbank frames. Zero init: inside the range of log-mel values, and the
        # first conv layer learns what to make of it.
        self.mask_embedding = nn.Parameter(torch.zeros(config.num_mel_bins))
        self.frame_rate: float
        self.subsampling: int
        self.receptive_field: int
        self.layer_dims: list[int]
        self._output_dim: int

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def num_layers(self) -> int:
        return len(self.layer_dims)

    @property
    def output_dim(self) -> int:
        """Channels of ``EncoderOutput.frames``."""
        return self._output_dim

    @abstractmethod
    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Exact output frame counts for fbank frame counts ``input_lengths`` [B]."""

    @abstractmethod
    def encode(self, feats: torch.Tensor, lengths: torch.Tensor, return_layers: bool
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(masked) fbank [B, T, F] -> (frames [B, T', D], per-layer outputs or [])."""

    def output_frame_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] fbank-frame mask -> [B, T'] output-frame mask.

        Output frame t' is masked iff input frame ``subsampling * t' + (receptive_field - 1) // 2``,
        the centre of the input frames its subsampling convolutions see, is masked.
        With 10-frame spans and a subsampling of 2 or 4 this is the majority vote in all but
        the frames at span edges.
        """
        B, T = frame_mask.shape
        t_out = int(self.output_lengths(torch.tensor([T])).item())
        centre = self.subsampling * torch.arange(t_out, device=frame_mask.device) + (self.receptive_field - 1) // 2
        return frame_mask[:, centre]

    def forward(self, feats: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, return_layers: bool = False) -> EncoderOutput:
        if feats.dim() != 3 or feats.shape[-1] != self.num_mel_bins:
            raise ValueError(f"expected fbank features [B, T, {self.num_mel_bins}], got {tuple(feats.shape)}")
        B, T, _ = feats.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long)
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=feats.device)
        if lengths.shape != (B,) or (B and (int(lengths.max()) > T or int(lengths.min()) < 0)):
            raise ValueError(f"lengths must be [B] = [{B}] values in [0, {T}], got {lengths.tolist()}")
        if T < self.min_input_frames:
            raise ValueError(f"{self.architecture}: need at least {self.min_input_frames} fbank frames "
                             f"({self.min_input_frames / self.input_frame_rate:.2f} s) in the batch, got {T}")
        if mask is not None:
            if mask.shape != (B, T):
                raise ValueError(f"mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
            emb = self.mask_embedding.to(feats.dtype)
            feats = torch.where(mask.to(feats.device).unsqueeze(-1), emb, feats)
        frames, layers = self.encode(feats, lengths, return_layers)
        out_lengths = self.output_lengths(lengths)
        valid = length_mask(out_lengths, frames.shape[1]).unsqueeze(-1)
        frames = frames * valid
        if return_layers:
            return EncoderOutput(frames, out_lengths, [y * valid for y in layers])
        return EncoderOutput(frames, out_lengths, None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
