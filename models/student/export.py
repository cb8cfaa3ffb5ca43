"""A trained student as a standalone model: safetensors weights + a JSON config, no Ray, no pickle.

An exported student is a directory (local path, ``file://`` or ``s3://`` prefix) with

- ``model.safetensors``: the encoder's weights (float32 unless exported otherwise);
- ``config.json``: ``{"format": "spear-student", "format_version": 1, "encoder": {architecture + config},
  "frontend": {Kaldi fbank settings}, "frame_rate", "layer_dims", "output_dim",
  "weights_sha256", "metadata": {...}}``. It is written last, so a directory with a
  config.json holds complete weights.

:func:`load_student` rebuilds the encoder from the config and loads the tensors with
``safetensors`` only (no ``torch.load``, nothing executes from the files), and wraps it with
the Kaldi fbank frontend as a :class:`StudentModel`: 16 kHz waveforms in, every layer's
frame features out, e.g. for probing or for using the student as the next teacher.

Example::

    >>> import tempfile, torch
    >>> from spear.models.student import build_encoder, export_student, load_student
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    >>> d = tempfile.mkdtemp()
    >>> _ = export_student(enc, d, metadata={"step": 1000})
    >>> student = load_student(d)
    >>> feats = student.features(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
    >>> len(feats.layers), feats.layers[0].shape, feats.lengths.tolist(), student.frame_rate
    (5, torch.Size([2, 45, 32]), [45, 20], 50.0)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save
from torch import nn

from spear.cluster.storage import Storage, join_uri
from spear.models.frontend import KaldiFbank

from .encoder import StudentEncoder, build_encoder, config_from_dict, config_to_dict

FORMAT = "spear-student"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _encoder_of(model: nn.Module) -> StudentEncoder:
    if isinstance(model, StudentEncoder):
        return model
    enc = getattr(model, "encoder", None)
    if isinstance(enc, StudentEncoder):
        return enc
    raise TypeError(f"export_student needs a StudentEncoder (or a module with .encoder), got {type(model).__name__}")


def export_student(model: nn.Module, path: Union[str, Path], metadata: Optional[Mapping[str, Any]] = None,
                   storage: Optional[Storage] = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write ``model``'s encoder (a :class:`StudentEncoder`, or e.g. a ``SpearObjective``: its
    ``.encoder``; prediction heads are not exported) to ``path``; returns the config written.

    ``metadata`` (JSON-serialisable: training step, token versions, ...) is stored as is.
    """
    enc = _encoder_of(model)
    storage = storage or Storage()
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in enc.state_dict().items()}
    blob = save(state, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    fbank = KaldiFbank(num_mel_bins=enc.num_mel_bins)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": config_to_dict(enc.config),
        "frontend": fbank.settings(),
        "frame_rate": enc.frame_rate,
        "layer_dims": list(enc.layer_dims),
        "output_dim": enc.output_dim,
        "num_parameters": enc.num_parameters(),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "metadata": dict(metadata or {}),
    }
    base = str(path)
    storage.makedirs(base)
    storage.write_bytes(join_uri(base, WEIGHTS_FILE), blob)
    storage.write_text(join_uri(base, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))
    return config


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
        self.fbank = KaldiFbank(num_mel_bins=encoder.num_mel_bins)
        self.config = dict(config or {})
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


def load_student(path: Union[str, Path], storage: Optional[Storage] = None,
                 device: Optional[Union[str, torch.device]] = None, cache_dir: Optional[str] = None) -> StudentModel:
    """Load an exported student from a local directory or an ``s3://`` prefix (cached locally).

    Raises FileNotFoundError when the files are missing and ValueError for a directory that
    is not a SPEAR student export (or whose weights do not match the config).
    """
    from spear.models.teachers.checkpoint import fetch_checkpoint

    local = Path(fetch_checkpoint(str(path), storage, cache_dir, patterns=(WEIGHTS_FILE, CONFIG_FILE)))
    cfg_path, weights_path = local / CONFIG_FILE, local / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path}: an exported student needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: not a SPEAR student export (format {config.get('format')!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {config['format_version']} is newer than this code "
                         f"({FORMAT_VERSION}); upgrade spear")
    state = load_file(str(weights_path))
    with torch.device("meta"):  # no throw-away random init of a large model
        encoder = build_encoder(config_from_dict(config["encoder"]))
    try:
        encoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the exported config: {exc}") from None
    model = StudentModel(encoder, config)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
