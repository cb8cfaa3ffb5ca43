"""The teacher interface: padded 16 kHz waveforms in, frame embeddings of one layer out.

Every teacher (MFCC, fbank, WavLM, HuBERT, Dasheng) is a frozen ``torch.nn.Module`` with
the same contract:

- ``forward(wavs [B, S] float, lengths [B]) -> TeacherOutput(embeddings [B, T, D] float32, num_frames [B])``;
  frames past ``num_frames[b]`` are zeros, and an utterance's embeddings do not depend on
  the padding or on the other utterances of the batch;
- ``num_frames_for(num_samples)``: the exact frame count for a length, so callers can plan;
- ``name``, ``frame_rate`` (Hz), ``dim`` and ``version``: a sha256 over the weights, the
  layer and the preprocessing settings, the same in every process.

Utterances too short for a single frame get ``num_frames == 0`` and are not run.
On CUDA the model runs under autocast (``autocast_dtype``, bf16 by default through
:func:`~spear.models.teachers.build_teacher`); feature front ends stay float32.

Example::

    >>> import torch
    >>> from spear.models.teachers import build_teacher
    >>> teacher = build_teacher("mfcc")
    >>> out = teacher(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
    >>> out.embeddings.shape, out.num_frames.tolist(), teacher.frame_rate
    (torch.Size([2, 49, 78]), [49, 24], 50.0)
"""

from __future__ import annotations

import hashlib
import json
import pickle
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

# Bump when a change in our code changes any teacher's output for the same weights and settings.
IMPLEMENTATION_VERSION = 1


@dataclass
class TeacherOutput:
    """Frame embeddings of a batch: ``embeddings`` [B, T, D] float32 (zeros past each
    utterance's frames) and ``num_frames`` [B] int64 (on the CPU)."""

    embeddings: torch.Tensor
    num_frames: torch.Tensor

    def unbatch(self) -> list[torch.Tensor]:
        """One [T_b, D] tensor per utterance."""
        return [self.embeddings[b, : int(n)] for b, n in enumerate(self.num_frames.tolist())]


class Teacher(nn.Module):
    """A frozen model that maps 16 kHz waveforms to frame embeddings of one layer.

    Subclasses set ``name``, ``frame_rate``, ``dim``, ``version`` and implement
    :meth:`num_frames_for` and :meth:`embed`; :meth:`forward` handles padding, devices,
    autocast and zero-frame utterances for all of them.
    """

    sample_rate: int = 16000
    name: str
    frame_rate: float
    dim: int
    version: str
    autocast_dtype: torch.dtype | None = None  # used on CUDA only

    @abstractmethod
    def num_frames_for(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Exact number of output frames for an utterance of ``num_samples`` samples."""

    @abstractmethod
    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, S] float32 on the model's device, lengths [B] (every utterance >= 1 frame,
        S == max(lengths)) -> [B, max(num_frames), D]; values past an utterance's frames are ignored."""

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor | Iterable[int] | None = None) -> TeacherOutput:
        if wavs.dim() != 2:
            raise ValueError(f"{self.name}: expected waveforms [B, S], got shape {tuple(wavs.shape)}")
        B, S = wavs.shape
        if lengths is None:
            lengths = torch.full((B,), S, dtype=torch.long)
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if lengths.shape != (B,):
            raise ValueError(f"{self.name}: lengths must have shape [{B}], got {tuple(lengths.shape)}")
        if B and (int(lengths.max()) > S or int(lengths.min()) < 0):
            raise ValueError(f"{self.name}: lengths must lie in [0, {S}]")
        nf = torch.as_tensor(self.num_frames_for(lengths), dtype=torch.long)
        T = int(nf.max()) if B else 0
        device = self.device
        out = torch.zeros(B, T, self.dim, dtype=torch.float32, device=device)
        keep = (nf > 0).nonzero().flatten()
        if keep.numel():
            sub_len = lengths[keep]
            sub = wavs[keep.to(wavs.device), : int(sub_len.max())].to(device=device, dtype=torch.float32)
            use_amp = device.type == "cuda" and self.autocast_dtype not in (None, torch.float32)
            with torch.inference_mode(), torch.autocast(device.type, dtype=self.autocast_dtype, enabled=use_amp):
                emb = self.embed(sub, sub_len.to(device))
            sub_nf = nf[keep]
            if emb.shape[1] != int(sub_nf.max()) or emb.shape[2] != self.dim:
                raise RuntimeError(f"{self.name}: embed() gave {tuple(emb.shape)}, expected "
                                   f"[{keep.numel()}, {int(sub_nf.max())}, {self.dim}] (frame-count formula out of sync)")
            mask = torch.arange(emb.shape[1], device=device).unsqueeze(0) < sub_nf.to(device).unsqueeze(1)
            out[keep.to(device), : emb.shape[1]] = torch.where(mask.unsqueeze(-1), emb.float(), 0.0)
        return TeacherOutput(out, nf)

    def describe(self) -> dict[str, Any]:
        """Name, frame rate, dim and version, e.g. for artefact metadata."""
        return {"name": self.name, "frame_rate": self.frame_rate, "dim": self.dim, "version": self.version}


def conv_frames(num_samples: int | torch.Tensor, kernels: Iterable[int], strides: Iterable[int]) -> int | torch.Tensor:
    """Output length of a stack of unpadded 1-d convolutions: L -> (L - k) // s + 1 per layer, never below 0."""
    n = num_samples.to(torch.long) if isinstance(num_samples, torch.Tensor) else int(num_samples)
    for k, s in zip(kernels, strides):
        if isinstance(n, torch.Tensor):
            n = torch.where(n >= k, (n - k) // s + 1, torch.zeros_like(n))
        else:
            n = (n - k) // s + 1 if n >= k else 0
    return n


def hash_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # a buffer: no copy of large weights
    return h.hexdigest()


def make_version(kind: str, weights: str | None, layer: int | None, settings: Mapping[str, Any]) -> str:
    """The teacher version id: sha256 of (kind, weights hash, layer, preprocessing settings, our code version)."""
    payload = {"kind": kind, "weights": weights, "layer": layer, "settings": dict(settings),
               "implementation": IMPLEMENTATION_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of files (sorted by name), read in 8 MiB blocks."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()


def read_weights(path: str | Path, what: str, suffixes: tuple[str, ...] = ()) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file (no pickled code runs), on the CPU.

    With ``suffixes``, ``path`` may also be a folder holding exactly one file with one of them.
    ``what`` names the checkpoint in errors: FileNotFoundError for a folder without exactly one
    such file, ValueError for a file holding objects other than tensors and plain values.
    """
    p = Path(path).expanduser()
    if suffixes and p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix in suffixes)
        if len(files) != 1:
            raise FileNotFoundError(f"{what} folder {p} must hold exactly one {'/'.join(suffixes)} file, "
                                    f"found {len(files)}")
        p = files[0]
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{what} {p} holds objects other than tensors and plain values; it cannot be loaded "
                         f"without executing code (torch.load weights_only=True): {exc}") from None
