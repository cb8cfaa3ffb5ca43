"""The student encoder contract, its size presets and the factory.

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

Presets (``size``, the table :data:`PRESETS`): ``tiny`` (tests), ``mini`` (tiny at twice the
width), ``small``, ``base`` (the pre-issue-13 preset, kept as it was: layers 1,2,2,3,1,1,1, dim
512, 85.7M) and the authors' published models, setting by setting (sources in docs/recipe.md):

=========== ============= ==== ==== ===== ======
preset      layers        dim  FFN  heads params
=========== ============= ==== ==== ===== ======
spear-base  1,2,3,3,1,1,1 512  1536 8     93.3M
spear-large 1,2,2,3,1,1,1 1024 3072 8     326.9M
spear-600m  1,2,3,4,1,1,1 1280 3840 8     597.0M
=========== ============= ==== ==== ===== ======

all with 7 stacks, downsampling 1,2,4,8,4,2,1, conv kernels 31,31,15,15,15,31,31, query / value /
positional head dims 32 / 12 / 4, positional encoding dim 48. A preset fixes the architecture;
the output frame rate is chosen apart (``frame_rate=25`` adds the output downsampling, 2
parameters): the authors' speech-only runs are 50 Hz, their unified runs 25 Hz. The transformer
baseline's presets are Conformers of about the same parameter budgets.

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

from dataclasses import fields
from typing import Any, Optional

from .base import StudentEncoder
from .configs import ARCHITECTURES, EncoderConfig, TransformerConfig, ZipformerConfig
from .transformer import ConformerEncoder
from .zipformer import Zipformer2

SIZES = ("tiny", "mini", "small", "base", "spear-base", "spear-large", "spear-600m")
FRAME_RATES = (50.0, 25.0)  # student output rates: Zipformer2 output downsampling 1 or 2

# The SPEAR architecture settings shared by the three published models (marcoyang1998/icefall
# egs/general_audio_encoder/mtl/run/train_{96m,316m,600m}_uniform_v2_zipformer_*.sh, and the
# train script's defaults for the head dims); the per-size ones are in PRESETS below.
_SPEAR_ZIPFORMER = dict(downsampling_factor=(1, 2, 4, 8, 4, 2, 1), cnn_module_kernel=(31, 31, 15, 15, 15, 31, 31),
                        query_head_dim=32, value_head_dim=12, pos_head_dim=4, pos_dim=48)

# The 5-stack shape of tiny and mini (mini is tiny at twice the width).
_TINY_ZIPFORMER = dict(downsampling_factor=(1, 2, 4, 2, 1), num_layers=1, cnn_module_kernel=(7, 7, 5, 7, 7))

# Size presets: THE table of student architectures (a checkpoint converter keys on it).
# Zipformer2 spear-base / spear-large / spear-600m are the authors' published models (93M,
# 327M, 600M); tiny / mini / small / base keep the 7-stack U-shape with fewer layers or smaller dims
# (base is the pre-issue-13 preset, one layer short of spear-base). Conformer presets match
# the Zipformer2 parameter budgets of the same name.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "zipformer2": {
        "tiny": dict(_TINY_ZIPFORMER, encoder_dim=(32, 48, 64, 48, 32),
                     feedforward_dim=(64, 96, 128, 96, 64), num_heads=2,
                     query_head_dim=8, pos_head_dim=2, value_head_dim=8, pos_dim=16,
                     subsampling_channels=(4, 8, 16)),
        # tiny at twice the width (1.15M parameters, 1.9x tiny's step time on one CPU core): the
        # demo's scale check, whether a larger student closes the dual-teacher gap (README)
        "mini": dict(_TINY_ZIPFORMER, encoder_dim=(64, 96, 128, 96, 64),
                     feedforward_dim=(128, 192, 256, 192, 128), num_heads=4,
                     query_head_dim=16, pos_head_dim=4, value_head_dim=12, pos_dim=32,
                     subsampling_channels=(8, 16, 32)),
        "small": dict(num_layers=(1, 1, 1, 2, 1, 1, 1), encoder_dim=256, feedforward_dim=768, num_heads=4),
        "base": dict(num_layers=(1, 2, 2, 3, 1, 1, 1), encoder_dim=512, feedforward_dim=1536, num_heads=8),
        "spear-base": dict(_SPEAR_ZIPFORMER, num_layers=(1, 2, 3, 3, 1, 1, 1), encoder_dim=512,
                           feedforward_dim=1536, num_heads=8),
        "spear-large": dict(_SPEAR_ZIPFORMER, num_layers=(1, 2, 2, 3, 1, 1, 1), encoder_dim=1024,
                            feedforward_dim=3072, num_heads=8),
        "spear-600m": dict(_SPEAR_ZIPFORMER, num_layers=(1, 2, 3, 4, 1, 1, 1), encoder_dim=1280,
                           feedforward_dim=3840, num_heads=8),
    },
    "transformer": {
        "tiny": dict(dim=64, num_layers=2, num_heads=4, feedforward_dim=128, conv_kernel=7,
                     subsampling_channels=16),
        "mini": dict(dim=128, num_layers=4, num_heads=4, feedforward_dim=256, conv_kernel=15,
                     subsampling_channels=32),
        "small": dict(dim=256, num_layers=10, num_heads=4, feedforward_dim=1024, conv_kernel=31),
        "base": dict(dim=512, num_layers=14, num_heads=8, feedforward_dim=2048, conv_kernel=31),
        "spear-base": dict(dim=512, num_layers=15, num_heads=8, feedforward_dim=2048, conv_kernel=31),
        "spear-large": dict(dim=1024, num_layers=16, num_heads=16, feedforward_dim=3072, conv_kernel=31),
        "spear-600m": dict(dim=1280, num_layers=19, num_heads=16, feedforward_dim=3840, conv_kernel=31),
    },
}


def frame_rate_overrides(architecture: str, frame_rate: Optional[float]) -> dict[str, int]:
    """The config field that gives output frame rate ``frame_rate`` (50 or 25 Hz; None: the preset's).

    Zipformer2 keeps its 50 Hz stacks and adds the output downsampling (the authors' way); the
    Conformer baseline subsamples its input 4x instead of 2x.

    >>> frame_rate_overrides("zipformer2", 25), frame_rate_overrides("transformer", 25)
    ({'output_downsampling_factor': 2}, {'subsampling_factor': 4})
    """
    if frame_rate is None:
        return {}
    if float(frame_rate) not in FRAME_RATES:
        raise ValueError(f"student frame_rate must be one of {', '.join(f'{r:g}' for r in FRAME_RATES)} Hz, "
                         f"got {frame_rate}")
    factor = round(50.0 / float(frame_rate))
    if architecture == "zipformer2":
        return {"output_downsampling_factor": factor}
    return {"subsampling_factor": 2 * factor}


def encoder_config(architecture: str = "zipformer2", size: str = "tiny", num_mel_bins: int = 128,
                   frame_rate: Optional[float] = None, **overrides: Any) -> EncoderConfig:
    """The config of preset ``size`` for ``architecture`` at ``frame_rate`` Hz (None: 50), with
    ``overrides`` applied.

    >>> encoder_config("transformer", "tiny", num_mel_bins=80, subsampling_factor=4).subsampling_factor
    4
    >>> encoder_config("zipformer2", "spear-base", frame_rate=25).output_downsampling_factor
    2
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
    return cls(**{**PRESETS[architecture][size], "num_mel_bins": num_mel_bins,
                  **frame_rate_overrides(architecture, frame_rate), **overrides})


def build_encoder(architecture: Any = "zipformer2", size: str = "tiny", num_mel_bins: int = 128,
                  **overrides: Any) -> StudentEncoder:
    """Build a student encoder from a preset, a config object, or a ``StudentConfig``.

    ``architecture`` may be an architecture name (then ``size``, ``num_mel_bins`` and
    ``overrides`` apply, ``frame_rate`` among them), a :class:`ZipformerConfig` /
    :class:`TransformerConfig`, or a :class:`spear.config.StudentConfig` (its architecture,
    size, num_mel_bins and frame_rate).

    >>> build_encoder("transformer", "tiny", num_mel_bins=40).frame_rate
    50.0
    """
    if isinstance(architecture, (ZipformerConfig, TransformerConfig)):
        cfg = architecture
    elif isinstance(architecture, str):
        cfg = encoder_config(architecture, size, num_mel_bins, **overrides)
    elif all(hasattr(architecture, a) for a in ("architecture", "size", "num_mel_bins")):
        overrides.setdefault("frame_rate", getattr(architecture, "frame_rate", None))
        if architecture.architecture == "zipformer2" and getattr(architecture, "whitening_limit", 0):
            for name in ("whitening_limit", "whitening_grad_scale", "whitening_prob"):
                overrides.setdefault(name, getattr(architecture, name))
        cfg = encoder_config(architecture.architecture, architecture.size, architecture.num_mel_bins, **overrides)
    else:
        raise TypeError(f"build_encoder: expected an architecture name, an encoder config or a StudentConfig, "
                        f"got {type(architecture).__name__}")
    if isinstance(cfg, ZipformerConfig):
        return Zipformer2(cfg)
    return ConformerEncoder(cfg)
