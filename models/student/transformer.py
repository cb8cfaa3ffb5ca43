"""The Transformer / Conformer baseline student, in plain torch, read top to bottom.

    fbank 100 Hz [B, T, F]
      -> ConvSubsampling: conv k3 stride 2, conv k3 stride 2 (4x, 25 Hz) or 1 (2x, 50 Hz), linear, LayerNorm
      -> num_layers blocks with rotary-position self-attention (torch's scaled_dot_product_attention)
      -> LayerNorm

With ``conv_kernel > 0`` each block is a Conformer block (Gulati et al., 2020): half-step FF,
self-attention, conv module (pointwise GLU, depthwise conv, norm, SiLU, pointwise), half-step
FF, LayerNorm. The conv module's norm is a LayerNorm rather than BatchNorm so an utterance's
output does not depend on its batch. With ``conv_kernel == 0`` blocks are plain pre-LN
transformer blocks. Positions enter only through rotary embeddings (relative by
construction) and, in Conformers, the convolutions.

Padding never changes a valid frame: the subsampling convolutions are unpadded in time (a
valid output frame sees only valid input frames), attention ignores padded keys, and padded
frames are zeroed before the depthwise convolution.

Example::

    >>> import torch
    >>> from spear.models.student.encoder import encoder_config
    >>> from spear.models.student.transformer import ConformerEncoder
    >>> model = ConformerEncoder(encoder_config("transformer", "tiny", num_mel_bins=80, subsampling_factor=4))
    >>> out = model.eval()(torch.randn(1, 101, 80), torch.tensor([101]))
    >>> out.frames.shape, model.frame_rate
    (torch.Size([1, 24, 64]), 25.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import StudentEncoder, conv_output_length, length_mask
from .configs import TransformerConfig


class ConvSubsampling(nn.Module):
    """[B, T, F] -> [B, T', dim] with two 3x3 convs (time strides 2 and ``factor // 2``, frequency strides 2, 2).

    Unpadded in time: output frame t' sees input frames factor * t' .. factor * t' + 6.
    """

    def __init__(self, num_mel_bins: int, dim: int, factor: int, channels: int, dropout: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(factor // 2, 2))
        freq = ((num_mel_bins - 3) // 2 + 1 - 3) // 2 + 1
        self.out = nn.Linear(channels * freq, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_length(conv_output_length(lengths, 3, 2), 3, self.factor // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x.unsqueeze(1)))
        x = F.gelu(self.conv2(x))  # [B, C, T', F']
        b, c, t, f = x.shape
        return self.dropout(self.norm(self.out(x.transpose(1, 2).reshape(b, t, c * f))))


def rotary_tables(T: int, head_dim: int, device, dtype, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim / 2] of the rotary position embedding (Su et al., RoFormer)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32).unsqueeze(1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x [B, H, T, d] by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; padded keys are ignored."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope).to(v.dtype), apply_rotary(k, *rope).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvModule(nn.Module):
    """Conformer conv module: LayerNorm, pointwise conv + GLU, depthwise conv, LayerNorm, SiLU, pointwise conv."""

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.pointwise1 = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm_mid = nn.LayerNorm(dim)
        self.pointwise2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pointwise1(self.norm_in(x)), dim=-1)
        x = x * keep.unsqueeze(-1).to(x.dtype)  # the kernel must not see padding
        x = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise2(F.silu(self.norm_mid(x))))


class Block(nn.Module):
    """A Conformer block (conv_kernel > 0) or a pre-LN transformer block (conv_kernel == 0)."""

    def __init__(self, dim: int, num_heads: int, feedforward_dim: int, conv_kernel: int, dropout: float):
        super().__init__()
        self.conformer = conv_kernel > 0
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.ff2 = FeedForward(dim, feedforward_dim, dropout)
        if self.conformer:
            self.ff1 = FeedForward(dim, feedforward_dim, dropout)
            self.conv = ConvModule(dim, conv_kernel, dropout)
            self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.conformer:
            x = x + 0.5 * self.ff1(x)
        x = x + self.attn_dropout(self.attn(self.norm_attn(x), keep, rope))
        if self.conformer:
            x = x + self.conv(x, keep)
            return self.norm_out(x + 0.5 * self.ff2(x))
        return x + self.ff2(x)


class ConformerEncoder(StudentEncoder):
    """The Transformer / Conformer baseline behind the :class:`StudentEncoder` interface."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        c = config
        self.subsample = ConvSubsampling(c.num_mel_bins, c.dim, c.subsampling_factor, c.subsampling_channels,
                                         c.dropout)
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.feedforward_dim, c.conv_kernel, c.dropout)
                                    for _ in range(c.num_layers))
        self.norm_out = nn.LayerNorm(c.dim)
        self.frame_rate = self.input_frame_rate / c.subsampling_factor
        self.subsampling, self.receptive_field = c.subsampling_factor, 7
        self.min_input_frames = 7
        self.layer_dims = [c.dim] * c.num_layers
        self._output_dim = c.dim

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        return self.subsample.output_lengths(torch.as_tensor(input_lengths, dtype=torch.long))

    def encode(self, feats: torch.Tensor, lengths: torch.Tensor, return_layers: bool
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.subsample(feats)
        B, T, _ = x.shape
        keep = length_mask(self.output_lengths(lengths), T)
        keep[:, 0] |= ~keep.any(dim=1)  # an empty utterance attends to its frame 0 (no all-masked row, no NaN)
        rope = rotary_tables(T, self.config.dim // self.config.num_heads, x.device, torch.float32)
        layers = []
        for block in self.blocks:
            x = block(x, keep, rope)
            if return_layers:
                layers.append(x)
        return self.norm_out(x), layers
