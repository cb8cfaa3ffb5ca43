"""Zipformer2, the SPEAR student, in plain torch (batch-first), read top to bottom.

A faithful re-implementation of the forward computation of icefall's
``egs/librispeech/ASR/zipformer/zipformer.py`` (Yao et al., "Zipformer: A faster and
better encoder for automatic speech recognition", 2023), configured as SPEAR uses it:

    fbank 100 Hz [B, T, F]
      -> Conv2dSubsampling (3 convs + ConvNeXt + linear + BiasNorm)      50 Hz, T' = (T - 7) // 2
      -> stack 0 (ds 1) -> stack 1 (ds 2) -> ... -> stack 6 (ds 1)       each stack: downsample by ds,
                                                                          its layers, upsample, bypass
      -> full-dim output (newest copy of every channel)                    50 Hz
      -> output downsampling by ``output_downsampling_factor`` (optional)  50 Hz (1) or 25 Hz (2)

``output_downsampling_factor`` 1 (the default) keeps 50 Hz, as icefall's SSL recipe
``egs/librispeech/SSL/zipformer`` and the authors' speech-only SPEAR runs; 2 gives 25 Hz, as
the authors' unified (speech + audio) runs (``--output-downsampling-factor 2`` in
marcoyang1998/icefall ``egs/general_audio_encoder/mtl/run/train_*_speech_audio_mvq_bucket_wavlm_all.sh``):
icefall's ``downsample_output``, a SimpleDownsample (softmax-weighted average of 2 frames, the
last frame repeated for an odd count), output lengths ``ceil(T' / 2)``. The ``spear-base``
preset has 93.3M parameters (the authors' Base, 93M), ``spear-large`` 326.9M (SPEAR-Large's
~327M), ``spear-600m`` 597.0M.

One Zipformer2 layer (in this order, every step residual):
FF1 (3/4 F) -> non-linear attention -> self-attention 1 -> conv 1 -> FF2 (F) -> bypass_mid
-> self-attention 2 -> conv 2 -> FF3 (5/4 F) -> BiasNorm -> bypass. The attention *weights*
(relative-position multi-head, "compact" positional encoding) are computed once per layer and
shared by the non-linear attention (head 0 only) and both self-attentions.

Kept from icefall: the architecture above, BiasNorm, SwooshL / SwooshR, the shared attention
weights with relative positions, NonlinAttention, the conv module (GLU-like gate, depthwise
conv, SwooshR), the learned bypass scales, SimpleDownsample (softmax-weighted frame averages)
and SimpleUpsample (repetition), the channel conversion between stacks and the full-dim output.
ScaledLinear's small initial scales are kept as plain initialisation.

Kept as an option (``whitening_limit`` > 0; the recipes turn it on): icefall's Whiten on every
layer's output and on the front end's output, a gradient-only regulariser that keeps frames from
collapsing onto a few directions (constant limit and probability here, scheduled in icefall).

Dropped or simplified (they only matter for ScaledAdam / early-training schedules):
Balancer and the other Whiten modules (gradient-only regularisers, identity in the forward pass),
ScheduledFloat schedules (dropout is a constant), random layer / module skipping
(``*_skip_rate``, ``const_attention_rate``, ``pos_emb_skip_rate``, the per-frame feature masks),
``penalize_abs_values_gt``, the bypass-scale lower-bound schedule (a constant clamp to
[0.2, 1] here, in training and evaluation alike), dropout on the positional encoding, time-shared
dropout masks (plain dropout here), the causal / streaming code. Because ScaledAdam's
parameter-scale-relative updates are not assumed (AdamW is the default optimiser), the
attention scores are scaled by query_head_dim ** -0.5 explicitly.
Added for batch invariance: padded frames are zeroed before every convolution over time and
replaced by the utterance's last valid frame before downsampling, so an utterance gives the
same output alone or in a padded batch.

Example::

    >>> import torch
    >>> from spear.models.student.encoder import encoder_config
    >>> from spear.models.student.zipformer import Zipformer2
    >>> model = Zipformer2(encoder_config("zipformer2", "tiny", num_mel_bins=80)).eval()
    >>> out = model(torch.randn(1, 107, 80), torch.tensor([107]))
    >>> out.frames.shape, model.frame_rate
    (torch.Size([1, 50, 64]), 50.0)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import StudentEncoder, length_mask
from .configs import ZipformerConfig

# --------------------------------------------------------------------------- activations and norm


def swoosh_l(x: torch.Tensor) -> torch.Tensor:
    """SwooshL(x) = log(1 + exp(x - 4)) - 0.08 x - 0.035 (used in the feed-forward modules)."""
    return F.softplus(x - 4.0) - 0.08 * x - 0.035


def swoosh_r(x: torch.Tensor) -> torch.Tensor:
    """SwooshR(x) = log(1 + exp(x - 1)) - 0.08 x - 0.313261687 (zero at x = 0; conv modules, subsampling)."""
    return F.softplus(x - 1.0) - 0.08 * x - 0.313261687


class BiasNorm(nn.Module):
    """x * exp(log_scale) / rms(x - bias): LayerNorm without the mean removal and per-channel gain.

    The learned bias only enters the scale, so one channel cannot be set to a large constant
    to defeat the normalisation (icefall's motivation); computed in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps  # all-zero padded frames would otherwise divide by zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = ((xf - self.bias.float()).pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()
        return (xf * scale * self.log_scale.float().clamp(-1.5, 1.5).exp()).to(x.dtype)


def whitening_metric(x: torch.Tensor) -> torch.Tensor:
    """How far frames x [N, D] are from white: D * tr(C^2) / tr(C)^2 for their covariance C.

    1 when every direction carries the same variance, D when all of it lies in one direction;
    it is D over the participation ratio of the covariance's eigenvalues (icefall's whitening metric).
    """
    x = x - x.mean(0)
    cov = x.t() @ x
    return (cov ** 2).sum() * cov.shape[0] / (cov.diagonal().sum() ** 2 + 1e-20)


class _WhitenGrad(torch.autograd.Function):
    """Identity forward; backward adds the gradient of the whitening metric, scaled to
    ``grad_scale`` times the norm of the incoming gradient, when the metric exceeds ``limit``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, valid: torch.Tensor, limit: float, grad_scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, valid)
        ctx.limit, ctx.grad_scale = limit, grad_scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, valid = ctx.saved_tensors
        with torch.enable_grad():
            frames = x.detach().float()[valid].requires_grad_(True)
            if frames.shape[0] > 1:
                metric = whitening_metric(frames)
                if float(metric.detach()) > ctx.limit:
                    (g,) = torch.autograd.grad(metric, frames)
                    scale = ctx.grad_scale * grad[valid].float().norm() / (g.norm() + 1e-20)
                    extra = torch.zeros_like(x, dtype=torch.float32)
                    extra[valid] = g * scale
                    grad = grad + extra.to(grad.dtype)
        return grad, None, None, None


class Whiten(nn.Module):
    """icefall's Whiten: a gradient-only regulariser (identity in the forward pass) that keeps a
    layer's output from collapsing onto a few directions.

    With probability ``prob`` per training step it measures :func:`whitening_metric` over the
    batch's valid frames and, above ``limit``, pushes them back toward white with a gradient of
    ``grad_scale`` times the size of the task's gradient. ``limit`` 0 switches it off.
    """

    def __init__(self, limit: float, grad_scale: float, prob: float):
        super().__init__()
        self.limit, self.grad_scale, self.prob = float(limit), float(grad_scale), float(prob)

    def forward(self, x: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
        if not (self.training and self.limit > 0 and self.grad_scale > 0 and x.requires_grad):
            return x
        if self.prob < 1.0 and float(torch.rand(())) >= self.prob:
            return x
        valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if pad is None else ~pad
        return _WhitenGrad.apply(x, valid, self.limit, self.grad_scale)


def scaled_linear(in_dim: int, out_dim: int, initial_scale: float, bias: bool = True) -> nn.Linear:
    """nn.Linear with weights (and bias range) scaled down at init, as icefall's ScaledLinear."""
    lin = nn.Linear(in_dim, out_dim, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(initial_scale)
        if bias:
            nn.init.uniform_(lin.bias, -0.1 * initial_scale, 0.1 * initial_scale)
    return lin


class Bypass(nn.Module):
    """orig + scale * (x - orig) with a learned per-channel scale in [0.2, 1] (init 0.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, orig: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return orig + (x - orig) * self.bypass_scale.clamp(0.2, 1.0)


# --------------------------------------------------------------------------- subsampling 100 Hz -> 50 Hz


class ConvNeXt(nn.Module):
    """Residual depthwise 7x7 conv -> pointwise expand x3 -> SwooshL -> pointwise (on [B, C, T, F])."""

    def __init__(self, channels: int, hidden_ratio: int = 3, kernel: tuple[int, int] = (7, 7)):
        super().__init__()
        pad = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel, padding=pad, groups=channels)
        self.pointwise_conv1 = nn.Conv2d(channels, channels * hidden_ratio, 1)
        self.pointwise_conv2 = nn.Conv2d(channels * hidden_ratio, channels, 1)
        with torch.no_grad():  # icefall's ScaledConv2d(initial_scale=0.01): start close to identity
            self.pointwise_conv2.weight.mul_(0.01)
            nn.init.uniform_(self.pointwise_conv2.bias, -0.001, 0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise_conv2(swoosh_l(self.pointwise_conv1(self.depthwise_conv(x))))


class Conv2dSubsampling(nn.Module):
    """[B, T, F] fbank -> [B, (T - 7) // 2, dim]: icefall's Zipformer2 front end (100 Hz -> 50 Hz).

    Time: conv k3 (no padding) -> conv k3 stride 2 -> conv k3; frequency: padded k3, then two
    stride-2 convs, leaving ((F - 1) // 2 - 1) // 2 bins. One output frame sees input frames
    2 t' .. 2 t' + 6 (the ConvNeXt then mixes +-3 output frames).
    """

    def __init__(self, num_mel_bins: int, dim: int, channels: tuple[int, int, int] = (8, 32, 128),
                 dropout: float = 0.1, whiten: tuple[float, float, float] = (0.0, 0.0, 0.0)):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=(0, 1))
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=(1, 2))
        self.convnext = ConvNeXt(c3)
        out_width = ((num_mel_bins - 1) // 2 - 1) // 2
        self.out = nn.Linear(out_width * c3, dim)
        self.out_whiten = Whiten(*whiten)  # (limit, grad_scale, prob)
        self.out_norm = BiasNorm(dim)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths - 7, 2, rounding_mode="floor").clamp_min(0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1)  # [B, 1, T, F]
        x = swoosh_r(self.conv1(x))
        x = swoosh_r(self.conv2(x))
        x = swoosh_r(self.conv3(x))  # [B, C, T', F']
        out_lengths = self.output_lengths(lengths)
        # ConvNeXt pads in time: zero the padded frames so valid frames see what they would alone.
        valid = length_mask(out_lengths, x.shape[2])
        x = x * valid[:, None, :, None].to(x.dtype)
        x = self.convnext(x)
        b, c, t, f = x.shape
        x = self.out_whiten(self.out(x.transpose(1, 2).reshape(b, t, c * f)), ~valid)
        return self.dropout(self.out_norm(x)), out_lengths


# --------------------------------------------------------------------------- relative positions


def compact_rel_pos_emb(T: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """icefall's CompactRelPositionalEncoding: [2T - 1, dim] for offsets -(T-1) .. T-1.

    Offsets are compressed logarithmically, mapped to (-pi/2, pi/2) by atan and expanded in
    a Fourier basis, so nearby offsets are well separated and large ones (1000 vs 1001)
    barely differ. The last channel is a constant 1 (a bias for the projection).
    """
    x = torch.arange(-(T - 1), T, device=device, dtype=torch.float32).unsqueeze(1)
    freqs = 1 + torch.arange(dim // 2, device=device, dtype=torch.float32)
    compression = dim ** 0.5
    x_compressed = compression * x.sign() * ((x.abs() + compression).log() - math.log(compression))
    x_atan = (x_compressed / (dim / (2.0 * math.pi))).atan()
    pe = torch.zeros(x.shape[0], dim, device=device)
    pe[:, 0::2] = (x_atan * freqs).cos()
    pe[:, 1::2] = (x_atan * freqs).sin()
    pe[:, -1] = 1.0
    return pe.to(dtype)


def rel_to_abs(pos_scores: torch.Tensor) -> torch.Tensor:
    """[B, H, T, 2T - 1] scores by relative offset -> [B, H, T, T]: out[..., i, j] = in[..., i, T - 1 - i + j].

    Column m of the input is offset m - (T - 1), so out[i, j] is the score of offset j - i;
    a strided view does the shift without copying (icefall's as_strided trick).
    """
    B, H, T, N = pos_scores.shape
    ps = pos_scores.contiguous()
    s0, s1, s2, s3 = ps.stride()
    return ps.as_strided((B, H, T, T), (s0, s1, s2 - s3, s3), storage_offset=ps.storage_offset() + s3 * (T - 1))


# --------------------------------------------------------------------------- the modules of a layer


class RelPositionAttentionWeights(nn.Module):
    """Multi-head attention *weights* [B, H, T, T] with relative-position scores.

    score(i, j) = q_i . k_j / sqrt(d_q) + p_i . P(j - i), with a small per-head positional
    query p (pos_head_dim) and a projection P of the compact positional encoding.
    """

    def __init__(self, dim: int, pos_dim: int, num_heads: int, query_head_dim: int, pos_head_dim: int):
        super().__init__()
        self.num_heads, self.query_head_dim, self.pos_head_dim = num_heads, query_head_dim, pos_head_dim
        self.in_proj = nn.Linear(dim, (2 * query_head_dim + pos_head_dim) * num_heads)
        self.linear_pos = scaled_linear(pos_dim, num_heads * pos_head_dim, 0.05, bias=False)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        H, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        q, k, p = self.in_proj(x).split([H * dq, H * dq, H * dp], dim=-1)
        q = q.view(B, T, H, dq).transpose(1, 2) * dq ** -0.5
        k = k.view(B, T, H, dq).transpose(1, 2)
        p = p.view(B, T, H, dp).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)  # [B, H, T, T]
        pos = self.linear_pos(pos_emb).view(2 * T - 1, H, dp).permute(1, 2, 0)  # [H, dp, 2T-1]
        scores = scores + rel_to_abs(p @ pos)
        if key_padding_mask is not None:
            # -1000, not -inf: a fully padded row (empty utterance) stays finite.
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], -1000.0)
        return scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)


class SelfAttention(nn.Module):
    """Values projected per head, mixed with given attention weights, projected back."""

    def __init__(self, dim: int, num_heads: int, value_head_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, num_heads * value_head_dim)
        self.out_proj = scaled_linear(num_heads * value_head_dim, dim, 0.05)

    def forward(self, x: torch.Tensor, attn_weights: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H = attn_weights.shape[1]
        v = self.in_proj(x).view(B, T, H, -1).transpose(1, 2)  # [B, H, T, dv]
        return self.out_proj((attn_weights @ v).transpose(1, 2).reshape(B, T, -1))


class NonlinAttention(nn.Module):
    """Like the conv module with attention in place of the convolution: (x * tanh(s)) mixed over
    time by one head's attention weights, gated by y, projected back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, 3 * hidden)
        self.out_proj = scaled_linear(hidden, dim, 0.05)

    def forward(self, x: torch.Tensor, attn_weights: torch.Tensor) -> torch.Tensor:
        s, v, y = self.in_proj(x).chunk(3, dim=-1)
        v = v * torch.tanh(s)
        v = (attn_weights[:, 0] @ v)  # head 0's weights: [B, T, T] @ [B, T, hidden]
        return self.out_proj(v * y)


class FeedForward(nn.Module):
    """Linear -> SwooshL -> dropout -> Linear (output initialised small)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = scaled_linear(hidden, dim, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(swoosh_l(self.in_proj(x))))


class ConvModule(nn.Module):
    """x * sigmoid(s) -> depthwise conv over time -> SwooshR -> Linear; padded frames zeroed first."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.out_proj = scaled_linear(dim, dim, 0.05)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x, s = self.in_proj(x).chunk(2, dim=-1)
        x = x * torch.sigmoid(s)
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        x = self.depthwise_conv(x.transpose(1, 2)).transpose(1, 2)
        return self.out_proj(swoosh_r(x))


# --------------------------------------------------------------------------- layer, stack, encoder


class Zipformer2Layer(nn.Module):
    def __init__(self, dim: int, pos_dim: int, num_heads: int, query_head_dim: int, pos_head_dim: int,
                 value_head_dim: int, feedforward_dim: int, kernel: int, dropout: float,
                 whiten: tuple[float, float, float] = (0.0, 0.0, 0.0)):
        super().__init__()
        self.self_attn_weights = RelPositionAttentionWeights(dim, pos_dim, num_heads, query_head_dim, pos_head_dim)
        self.self_attn1 = SelfAttention(dim, num_heads, value_head_dim)
        self.self_attn2 = SelfAttention(dim, num_heads, value_head_dim)
        self.feed_forward1 = FeedForward(dim, feedforward_dim * 3 // 4, dropout)
        self.feed_forward2 = FeedForward(dim, feedforward_dim, dropout)
        self.feed_forward3 = FeedForward(dim, feedforward_dim * 5 // 4, dropout)
        self.nonlin_attention = NonlinAttention(dim, 3 * dim // 4)
        self.conv_module1 = ConvModule(dim, kernel)
        self.conv_module2 = ConvModule(dim, kernel)
        self.norm = BiasNorm(dim)
        self.bypass_mid = Bypass(dim)
        self.bypass = Bypass(dim)
        self.whiten = Whiten(*whiten)  # (limit, grad_scale, prob)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
        orig = x
        w = self.self_attn_weights(x, pos_emb, pad)  # shared by the three attention modules below
        x = x + self.feed_forward1(x)
        x = x + self.nonlin_attention(x, w)
        x = x + self.self_attn1(x, w)
        x = x + self.conv_module1(x, pad)
        x = x + self.feed_forward2(x)
        x = self.bypass_mid(orig, x)
        x = x + self.self_attn2(x, w)
        x = x + self.conv_module2(x, pad)
        x = x + self.feed_forward3(x)
        x = self.norm(x)
        return self.whiten(self.bypass(orig, x), pad)


def downsample(x: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """icefall's SimpleDownsample: [B, T, D] -> [B, ceil(T / ds), D], softmax(logits)-weighted
    averages of ds consecutive frames. Frames past an utterance's end are replaced by its last
    valid frame first (icefall repeats the batch's last frame), so padding never leaks in."""
    B, T, D = x.shape
    ds = logits.numel()
    Td = (T + ds - 1) // ds
    idx = torch.arange(Td * ds, device=x.device).unsqueeze(0)
    idx = torch.minimum(idx, (lengths - 1).clamp_min(0).unsqueeze(1))  # [B, Td * ds]
    x = x.gather(1, idx.unsqueeze(-1).expand(B, Td * ds, D))
    w = logits.softmax(0).to(x.dtype)
    return (x.view(B, Td, ds, D) * w.view(1, 1, ds, 1)).sum(2)


class Zipformer2Stack(nn.Module):
    """Layers at 1/ds of the base (50 Hz) rate: downsample, run, upsample by repetition, bypass."""

    def __init__(self, num_layers: int, ds: int, dim: int, pos_dim: int, **layer_kwargs):
        super().__init__()
        self.ds, self.pos_dim = ds, pos_dim
        self.layers = nn.ModuleList(Zipformer2Layer(dim, pos_dim, **layer_kwargs) for _ in range(num_layers))
        if ds > 1:
            self.downsample_bias = nn.Parameter(torch.zeros(ds))  # softmax -> uniform average at init
            self.out_combiner = Bypass(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, T, D] at the base rate -> (output [B, T, D], each layer's output upsampled to [B, T, D])."""
        orig, T = x, x.shape[1]
        if self.ds > 1:
            x = downsample(x, lengths, self.downsample_bias)
            lengths = torch.div(lengths + self.ds - 1, self.ds, rounding_mode="floor")
        pad = ~length_mask(lengths, x.shape[1])
        pos_emb = compact_rel_pos_emb(x.shape[1], self.pos_dim, x.device, x.dtype)
        outputs = []
        for layer in self.layers:
            x = layer(x, pos_emb, pad)
            outputs.append(x)
        if self.ds == 1:
            return x, outputs
        outputs = [y.repeat_interleave(self.ds, dim=1)[:, :T] for y in outputs]  # SimpleUpsample
        return self.out_combiner(orig, outputs[-1]), outputs


class OutputDownsample(nn.Module):
    """icefall's ``downsample_output`` (a SimpleDownsample): [B, T, D] -> [B, ceil(T / ds), D].

    The parameter is named ``bias`` as icefall's, so a checkpoint's
    ``encoder.downsample_output.bias`` maps onto ``downsample_output.bias`` one to one.
    """

    def __init__(self, ds: int):
        super().__init__()
        self.ds = ds
        self.bias = nn.Parameter(torch.zeros(ds))  # softmax -> uniform average at init

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.ds - 1, self.ds, rounding_mode="floor")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return downsample(x, lengths, self.bias)


def convert_num_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Truncate channels, or zero-pad them, to ``dim`` (the hand-over between stacks of different widths)."""
    if dim <= x.shape[-1]:
        return x[..., :dim]
    return F.pad(x, (0, dim - x.shape[-1]))


class Zipformer2(StudentEncoder):
    """SPEAR's student: Conv2dSubsampling to 50 Hz, U-shaped stacks of Zipformer2 layers, then
    (``output_downsampling_factor`` > 1) the output downsampling to 50 / factor Hz.

    ``return_layers`` gives every layer's output at the output frame rate; the layers of a
    downsampled stack are upsampled by repetition (before the stack's output bypass), and with
    output downsampling every layer goes through the same learned ``downsample_output`` as the
    final output (so probes see the frame rate the model is trained at); their widths are
    ``layer_dims``.
    """

    def __init__(self, config: ZipformerConfig):
        super().__init__(config)
        c = config
        whiten = (c.whitening_limit, c.whitening_grad_scale, c.whitening_prob)
        self.encoder_embed = Conv2dSubsampling(c.num_mel_bins, c.encoder_dim[0], c.subsampling_channels, c.dropout,
                                               whiten)
        self.stacks = nn.ModuleList(
            Zipformer2Stack(c.num_layers[i], c.downsampling_factor[i], c.encoder_dim[i], c.pos_dim,
                            num_heads=c.num_heads[i], query_head_dim=c.query_head_dim, pos_head_dim=c.pos_head_dim,
                            value_head_dim=c.value_head_dim, feedforward_dim=c.feedforward_dim[i],
                            kernel=c.cnn_module_kernel[i], dropout=c.dropout,
                            whiten=whiten)
            for i in range(len(c.downsampling_factor)))
        ods = c.output_downsampling_factor
        if ods > 1:  # absent at 1, so 50 Hz checkpoints keep their exact key set
            self.downsample_output = OutputDownsample(ods)
        self.frame_rate = self.input_frame_rate / 2 / ods
        # One output frame averages ods 50 Hz frames, which see fbank frames 2 t .. 2 t + 6 each:
        # together 2 ods t' .. 2 ods t' + 6 + 2 (ods - 1).
        self.subsampling, self.receptive_field = 2 * ods, 7 + 2 * (ods - 1)
        self.min_input_frames = 7
        self.layer_dims = [d for d, n in zip(c.encoder_dim, c.num_layers) for _ in range(n)]
        self._output_dim = max(c.encoder_dim)

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        lengths = Conv2dSubsampling.output_lengths(torch.as_tensor(input_lengths, dtype=torch.long))
        if self.config.output_downsampling_factor > 1:
            lengths = self.downsample_output.output_lengths(lengths)
        return lengths

    def encode(self, feats: torch.Tensor, lengths: torch.Tensor, return_layers: bool
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, lengths = self.encoder_embed(feats, lengths)
        stack_outputs, layers = [], []
        for dim, stack in zip(self.config.encoder_dim, self.stacks):
            x, outs = stack(convert_num_channels(x, dim), lengths)
            stack_outputs.append(x)
            if return_layers:
                layers.extend(outs)
        out = self._full_dim_output(stack_outputs)
        if self.config.output_downsampling_factor > 1:
            out = self.downsample_output(out, lengths)
            layers = [self.downsample_output(y, lengths) for y in layers]
        return out, layers

    def _full_dim_output(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Every channel up to max(encoder_dim), taken from the last stack that has it."""
        dims = self.config.encoder_dim
        pieces, cur = [outputs[-1]], dims[-1]
        for i in range(len(dims) - 2, -1, -1):
            if dims[i] > cur:
                pieces.append(outputs[i][..., cur:dims[i]])
                cur = dims[i]
        return torch.cat(pieces, dim=-1)
