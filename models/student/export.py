"""A trained student as a standalone model, to and from plain weights and a config dict.

:func:`export_state` and :func:`export_fields` give what an export stores (the encoder's
weights, its config and the Kaldi fbank frontend settings); :func:`build_student` rebuilds a
:class:`StudentModel` from them: 16 kHz waveforms in, every layer's frame features out, e.g.
for probing or for using the student as the next teacher. Prediction heads are not part of it.

Files and storage are elsewhere: :mod:`spear.schemas.student_export` is the on-storage format
(``model.safetensors`` + ``config.json``) and :mod:`spear.stages.artefacts` writes and reads it
(``export_student`` / ``load_student``, local or s3://).

Example::

    >>> import torch
    >>> from spear.models.student import build_encoder, build_student, export_fields, export_state
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    >>> student = build_student(export_fields(enc), export_state(enc), device="cpu")
    >>> feats = student.features(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
    >>> len(feats.layers), feats.layers[0].shape, feats.lengths.tolist(), student.frame_rate
    (5, torch.Size([2, 45, 32]), [45, 20], 50.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from spear.models.device import default_device
from spear.models.frontend import KaldiFbank

from .base import StudentEncoder
from .configs import config_from_dict, config_to_dict
from .encoder import build_encoder


def encoder_of(model: nn.Module) -> StudentEncoder:
    """The :class:`StudentEncoder` of ``model``: itself, or its ``.encoder`` (e.g. a ``SpearObjective``)."""
    if isinstance(model, StudentEncoder):
        return model
    enc = getattr(model, "encoder", None)
    if isinstance(enc, StudentEncoder):
        return enc
    raise TypeError(f"export_student needs a StudentEncoder (or a module with .encoder), got {type(model).__name__}")


def export_state(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The encoder's weights, contiguous on the CPU, floating-point tensors cast to ``dtype``."""
    enc = encoder_of(model)
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in enc.state_dict().items()}


def export_fields(model: nn.Module) -> dict[str, Any]:
    """What rebuilds the encoder and describes it: ``encoder`` (architecture + config), ``frontend``
    (Kaldi fbank settings), ``frame_rate``, ``layer_dims``, ``output_dim``, ``num_parameters``."""
    enc = encoder_of(model)
    return {
        "encoder": config_to_dict(enc.config),
        "frontend": (model.fbank.settings() if isinstance(getattr(model, "fbank", None), KaldiFbank)  # a StudentModel's
                     else KaldiFbank(num_mel_bins=enc.num_mel_bins).settings()),
        "frame_rate": enc.frame_rate,
        "layer_dims": list(enc.layer_dims),
        "output_dim": enc.output_dim,
        "num_parameters": enc.num_parameters(),
    }


@dataclass
class StudentFeatures:
    """``layers``: one [B, T, D_l] tensor per encoder layer; ``final``: the encoder output
    [B, T, D]; ``lengths`` [B]: valid frames (frames past them are zeros)."""

    layers: list[torch.Tensor]
    final: torch.Tensor
    lengths: torch.Tensor


class StudentModel(nn.Module):
    """A loaded student: Kaldi fbank frontend + encoder, in eval mode.

    ``features(wavs [B, S] 16 kHz float in [-1, 1), lengths [B]) -> StudentFeatures``.
    """

    sample_rate = 16000

    def __init__(self, encoder: StudentEncoder, config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.encoder = encoder.eval()
        self.config = dict(config or {})
        band = {k: v for k, v in (self.config.get("frontend") or {}).items() if k in ("low_freq", "high_freq")}
        # the mel band may differ from Kaldi's default (a converted SPEAR release: lhotse's high_freq -400)
        self.fbank = KaldiFbank(num_mel_bins=encoder.num_mel_bins, **band)
        if self.config.get("frontend") and self.config["frontend"] != self.fbank.settings():
            raise ValueError(f"exported frontend settings {self.config['frontend']} differ from this "
                             f"version's Kaldi fbank {self.fbank.settings()}")

    @property
    def frame_rate(self) -> float:
        return self.encoder.frame_rate

    @property
    def layer_dims(self) -> list[int]:
        return list(self.encoder.layer_dims)

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def num_frames_for(self, num_samples: Union[int, torch.Tensor]) -> torch.Tensor:
        """Exact output frames for utterances of ``num_samples`` samples."""
        n = torch.as_tensor(num_samples, dtype=torch.long)
        return self.encoder.output_lengths(self.fbank.num_frames(n))

    @torch.no_grad()
    def features(self, wavs: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> StudentFeatures:
        """Every layer's frame features for a batch of waveforms (runs on the model's device;
        ``autocast_dtype`` e.g. torch.bfloat16 enables autocast on CUDA; the fbank stays float32)."""
        device = next(self.encoder.parameters()).device
        wavs = wavs.to(device)
        feats, n = self.fbank(wavs, None if lengths is None else torch.as_tensor(lengths).to(device))
        short = self.encoder.min_input_frames - feats.shape[1]
        if short > 0:  # a batch of very short clips: pad so the convolutions run; lengths keep them empty
            feats = torch.nn.functional.pad(feats, (0, 0, 0, short))
        use_amp = device.type == "cuda" and autocast_dtype not in (None, torch.float32)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
            out = self.encoder(feats, n, return_layers=True)
        return StudentFeatures([y.float() for y in out.layers], out.frames.float(), out.lengths)

    def forward(self, wavs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> StudentFeatures:
        return self.features(wavs, lengths)


def build_student(config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                  device: Optional[Union[str, torch.device]] = None) -> StudentModel:
    """A :class:`StudentModel` (eval mode, on ``device``; default: CUDA if present) from an export's
    ``config`` (at least the ``encoder`` field of :func:`export_fields`) and weights ``state``.

    Raises ValueError when the weights do not fit the config.
    """
    with torch.device("meta"):  # no throw-away random init of a large model
        encoder = build_encoder(config_from_dict(config["encoder"]))
    try:
        encoder.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"weights do not match the exported config: {exc}") from None
    model = StudentModel(encoder, config)
    return model.to(torch.device(device) if device is not None else default_device()).eval()
