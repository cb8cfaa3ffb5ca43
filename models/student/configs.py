"""Student encoder configs: one frozen dataclass per architecture, and their JSON-ready dicts.

:class:`ZipformerConfig` (Zipformer2) and :class:`TransformerConfig` (Conformer / transformer
baseline) hold every hyper-parameter of an encoder; :func:`config_to_dict` and
:func:`config_from_dict` turn them into plain dicts and back (an exported student stores one).

Example::

    >>> from spear.models.student.configs import TransformerConfig, config_from_dict, config_to_dict
    >>> cfg = TransformerConfig(dim=64, num_heads=4)
    >>> config_to_dict(cfg)["architecture"], config_from_dict(config_to_dict(cfg)) == cfg
    ('transformer', True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping, Union

ARCHITECTURES = ("zipformer2", "transformer")


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
    # 1: 50 Hz output; 2: 25 Hz (icefall's downsample_output; the authors' unified SPEAR runs).
    output_downsampling_factor: int = 1
    # icefall's Whiten on every layer's output and the front end's (gradient-only; no parameters, so checkpoints are
    # unaffected): limit 0 is off. icefall's layers use limit 4 (rising to 12 over 20k batches),
    # grad_scale 0.01, prob 0.025-0.25.
    whitening_limit: float = 0.0
    whitening_grad_scale: float = 0.01
    whitening_prob: float = 0.25

    @property
    def frame_rate(self) -> float:
        """Output frames per second: 100 Hz fbank, 2x conv subsampling, then the output downsampling."""
        return 50.0 / self.output_downsampling_factor

    def __post_init__(self) -> None:
        if int(self.output_downsampling_factor) not in (1, 2):
            raise ValueError(f"output_downsampling_factor must be 1 (50 Hz) or 2 (25 Hz), "
                             f"got {self.output_downsampling_factor}")
        object.__setattr__(self, "output_downsampling_factor", int(self.output_downsampling_factor))
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

    @property
    def frame_rate(self) -> float:
        """Output frames per second: 100 Hz fbank over the conv subsampling factor."""
        return 100.0 / self.subsampling_factor

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
