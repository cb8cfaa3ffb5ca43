"""The student encoder interface, its size presets and the factory.

Every student encoder (:class:`~spear.models.student.zipformer.Zipformer2`,
:class:`~spear.models.student.transformer.ConformerEncoder`) is a :class:`StudentEncoder`:

- input: 100 Hz log-mel fbank ``feats`` [B, T, num_mel_bins] and ``lengths`` [B] (frames);
- ``forward(feats, lengths, mask=None, return_layers=False) -> EncoderOutput``: ``mask`` [B, T]
  (bool, True = masked) marks fbank frames that are replaced by the learned
  ``mask_embedding`` *before* the conv subsampling (SPEAR masks fbank frames, not
  encoder frames); ``EncoderOutput.frames`` [B, T', D] are zero past ``lengths`` [B];
  ``layers`` (with ``return_layers``) holds every encoder layer's output at the output
  frame rate, for probing or for using the student as the next teacher;
- ``output_lengths(input_lengths)``: the exact output frame counts, computable before the forward
  (target alignment needs them);
- ``output_frame_mask(mask)``: the fbank-frame mask mapped to output frames (for accuracies
  on masked / unmasked frames): an output frame is *masked* when the centre input frame of
  its subsampling receptive field is masked;
- ``frame_rate`` (Hz), ``output_dim``, ``layer_dims`` and the ``config`` it was built from.

An utterance's outputs never depend on the padding or on the other utterances of the batch.

Presets (``size``): ``tiny`` (tests), ``small``, ``base``, ``spear-large`` (SPEAR-Large:
7 Zipformer2 stacks, downsampling 1,2,4,8,4,2,1, layers 1,2,2,3,1,1,1, dim 1024, FFN 3072,
8 heads, ~327M parameters, 50 Hz) and ``spear-600m`` (layers 1,2,3,4,1,1,1, dim 1280, FFN 3840).
The transformer baseline's presets are Conformers of about the same parameter budgets.

Example::

    >>> import torch
    >>> from spear.models.student import build_encoder
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=80).eval()
    >>> feats, lengths = torch.randn(2, 200, 80), torch.tensor([200, 150])
    >>> out = enc(feats, lengths, return_layers=True)
    >>> out.frames.shape, out.lengths.tolist(), enc.frame_rate, len(out.layers) == enc.num_layers
    (torch.Size([2, 96, 64]), [96, 71], 50.0, True)
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import nn

ARCHITECTURES = ("zipformer2", "transformer")
SIZES = ("tiny", "small", "base", "spear-large", "spear-600m")

INPUT_FRAME_RATE = 100.0  # fbank frames per second (25 ms window, 10 ms shift)


# --------------------------------------------------------------------------- configs


def _per_stack(value: Union[int, tuple[int, ...], list[int]], n: int, name: str) -> tuple[int, ...]:
    """An int or a 1-tuple broadcast to one value per stack (as icefall's ``_to_tuple``)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"{name} needs one value per stack ({n}), got {len(value)}: {value}")
    return value


@dataclass(frozen=True)
class ZipformerConfig:
    """Zipformer2 hyper-parameters (names as icefall's ``Zipformer2``); per-stack fields take an int or a tuple."""

    architecture: ClassVar[str] = "zipformer2"
    num_mel_bins: int = 128
    downsampling_factor: tuple[int, ...] = (1, 2, 4, 8, 4, 2, 1)
    num_layers: tuple[int, ...] = (1, 2, 2, 3, 1, 1, 1)
    encoder_dim: tuple[int, ...] = (1024,)
    feedforward_dim: tuple[int, ...] = (3072,)
    num_heads: tuple[int, ...] = (8,)
    cnn_module_kernel: tuple[int, ...] = (31, 31, 15, 15, 15, 31, 31)
    query_head_dim: int = 32
    pos_head_dim: int = 4
    value_head_dim: int = 12
    pos_dim: int = 48
    subsampling_channels: tuple[int, int, int] = (8, 32, 128)  # Conv2dSubsampling layer1..3 channels
    dropout: float = 0.1

    def __post_init__(self) -> None:
        n = len(self.downsampling_factor)
        if n == 0:
            raise ValueError("downsampling_factor needs at least one stack")
        object.__setattr__(self, "downsampling_factor", tuple(int(d) for d in self.downsampling_factor))
        for name in ("num_layers", "encoder_dim", "feedforward_dim", "num_heads", "cnn_module_kernel"):
            object.__setattr__(self, name, _per_stack(getattr(self, name), n, name))
        object.__setattr__(self, "subsampling_channels", tuple(int(c) for c in self.subsampling_channels))
        if any(d < 1 for d in self.downsampling_factor):
            raise ValueError(f"downsampling factors must be >= 1, got {self.downsampling_factor}")
        if any(k % 2 == 0 for k in self.cnn_module_kernel):
            raise ValueError(f"cnn_module_kernel must be odd, got {self.cnn_module_kernel}")
        if self.pos_dim % 2:
            raise ValueError("pos_dim must be even")
        if any(d % 4 for d in self.encoder_dim):
            raise ValueError("encoder_dim must be a multiple of 4 (non-linear attention uses 3/4 of it)")
        if self.num_mel_bins < 7:
            raise ValueError("Zipformer2's Conv2dSubsampling needs at least 7 mel bins")


@dataclass(frozen=True)
class TransformerConfig:
    """Transformer / Conformer baseline: conv subsampling (2x -> 50 Hz or 4x -> 25 Hz), then
    ``num_layers`` blocks; ``conv_kernel > 0`` makes them Conformer blocks, 0 plain pre-LN transformer blocks."""

    architecture: ClassVar[str] = "transformer"
    num_mel_bins: int = 128
    dim: int = 1024
    num_layers: int = 16
    num_heads: int = 16
    feedforward_dim: int = 3072
    conv_kernel: int = 31
    subsampling_factor: int = 2
    subsampling_channels: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.subsampling_factor not in (2, 4):
            raise ValueError(f"subsampling_factor must be 2 (50 Hz) or 4 (25 Hz), got {self.subsampling_factor}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError("dim must split into heads of an even size (rotary position embedding)")
        if self.conv_kernel and self.conv_kernel % 2 == 0:
            raise ValueError("conv_kernel must be odd (or 0 for a plain transformer)")
        if self.num_mel_bins < 7:
            raise ValueError("the conv subsampling needs at least 7 mel bins")


EncoderConfig = Union[ZipformerConfig, TransformerConfig]

# Size presets. Zipformer2 spear-large / spear-600m are SPEAR's published configurations;
# the smaller ones keep the 7-stack U-shape and shrink dims. Conformer presets match the
# Zipformer2 parameter budgets of the same name.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "zipformer2": {
        "tiny": dict(downsampling_factor=(1, 2, 4, 2, 1), num_layers=1, encoder_dim=(32, 48, 64, 48, 32),
                     feedforward_dim=(64, 96, 128, 96, 64), num_heads=2, cnn_module_kernel=(7, 7, 5, 7, 7),
                     query_head_dim=8, pos_head_dim=2, value_head_dim=8, pos_dim=16,
                     subsampling_channels=(4, 8, 16)),
        "small": dict(num_layers=(1, 1, 1, 2, 1, 1, 1), encoder_dim=256, feedforward_dim=768, num_heads=4),
        "base": dict(num_layers=(1, 2, 2, 3, 1, 1, 1), encoder_dim=512, feedforward_dim=1536, num_heads=8),
        "spear-large": dict(num_layers=(1, 2, 2, 3, 1, 1, 1), encoder_dim=1024, feedforward_dim=3072, num_heads=8),
        "spear-600m": dict(num_layers=(1, 2, 3, 4, 1, 1, 1), encoder_dim=1280, feedforward_dim=3840, num_heads=8),
    },
    "transformer": {
        "tiny": dict(dim=64, num_layers=2, num_heads=4, feedforward_dim=128, conv_kernel=7,
                     subsampling_channels=16),
        "small": dict(dim=256, num_layers=10, num_heads=4, feedforward_dim=1024, conv_kernel=31),
        "base": dict(dim=512, num_layers=14, num_heads=8, feedforward_dim=2048, conv_kernel=31),
        "spear-large": dict(dim=1024, num_layers=16, num_heads=16, feedforward_dim=3072, conv_kernel=31),
        "spear-600m": dict(dim=1280, num_layers=19, num_heads=16, feedforward_dim=3840, conv_kernel=31),
    },
}


def encoder_config(architecture: str = "zipformer2", size: str = "tiny", num_mel_bins: int = 128,
                   **overrides: Any) -> EncoderConfig:
    """The config of preset ``size`` for ``architecture``, with ``overrides`` applied.

    >>> encoder_config("transformer", "tiny", num_mel_bins=80, subsampling_factor=4).subsampling_factor
    4
    """
    if architecture not in PRESETS:
        raise ValueError(f"unknown student architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    if size not in PRESETS[architecture]:
        raise ValueError(f"unknown student size {size!r}: use one of {', '.join(SIZES)}")
    cls = ZipformerConfig if architecture == "zipformer2" else TransformerConfig
    known = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown {architecture} config field(s) {bad}; known: {sorted(known)}")
    return cls(**{**PRESETS[architecture][size], "num_mel_bins": num_mel_bins, **overrides})


def config_to_dict(cfg: EncoderConfig) -> dict[str, Any]:
    """JSON-ready dict of a config, with its ``architecture``."""
    return {"architecture": cfg.architecture, **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in asdict(cfg).items()}}


def config_from_dict(data: Mapping[str, Any]) -> EncoderConfig:
    """Inverse of :func:`config_to_dict`."""
    data = dict(data)
    arch = data.pop("architecture", None)
    if arch == "zipformer2":
        return ZipformerConfig(**data)
    if arch == "transformer":
        return TransformerConfig(**data)
    raise ValueError(f"unknown student architecture {arch!r} in config: use one of {', '.join(ARCHITECTURES)}")


def build_encoder(architecture: Any = "zipformer2", size: str = "tiny", num_mel_bins: int = 128,
                  **overrides: Any) -> "StudentEncoder":
    """Build a student encoder from a preset, a config object, or a ``StudentConfig``.

    ``architecture`` may be an architecture name (then ``size``, ``num_mel_bins`` and
    ``overrides`` apply), a :class:`ZipformerConfig` / :class:`TransformerConfig`, or a
    :class:`spear.config.StudentConfig` (its architecture, size and num_mel_bins).

    >>> build_encoder("transformer", "tiny", num_mel_bins=40).frame_rate
    50.0
    """
    if isinstance(architecture, (ZipformerConfig, TransformerConfig)):
        cfg = architecture
    elif isinstance(architecture, str):
        cfg = encoder_config(architecture, size, num_mel_bins, **overrides)
    elif all(hasattr(architecture, a) for a in ("architecture", "size", "num_mel_bins")):
        cfg = encoder_config(architecture.architecture, architecture.size, architecture.num_mel_bins, **overrides)
    else:
        raise TypeError(f"build_encoder: expected an architecture name, an encoder config or a StudentConfig, "
                        f"got {type(architecture).__name__}")
    if isinstance(cfg, ZipformerConfig):
        from .zipformer import Zipformer2

        return Zipformer2(cfg)
    from .transformer import ConformerEncoder

    return ConformerEncoder(cfg)


# --------------------------------------------------------------------------- shared pieces


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
