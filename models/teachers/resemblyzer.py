"""Resemblyzer's GE2E speaker encoder as a frame-level speech teacher, in plain torch.

The ``resemblyzer`` wheel (Apache-2.0) ships ``resemblyzer/pretrained.pt``: a GE2E speaker
encoder (Wan et al., 2018) trained on 1.6 s partial utterances of speech at 16 kHz. The
network, as the package runs it:

1. the waveform's volume raised (never lowered) to -30 dBFS over the utterance
   (``resemblyzer.audio.normalize_volume``, part of its ``preprocess_wav``);
2. a 40-band mel *power* spectrogram (not log): 25 ms Hann window (n_fft 400), 10 ms hop,
   ``center=True`` with zero padding, Slaney mel scale and area normalisation (librosa's
   ``melspectrogram`` defaults), 100 Hz;
3. a 3-layer LSTM (40 -> 256 -> 256 -> 256) over the mel frames;
4. the speaker embedding of a partial: ``relu(linear(h_last))``, L2-normalised.

Silence trimming (the other half of ``preprocess_wav``) is left out: it would move frames
away from the audio's time axis, which the student's targets need.

Layers: 1, 2, 3 are the LSTM layers' outputs at every frame (256-d); 4 is the projection,
``relu(linear(h_t))`` L2-normalised per frame: at a frame that ends a 1.6 s window it is
exactly the package's partial embedding. Default **3**, the last LSTM layer: the state the GE2E
loss shapes into speaker identity, before the ReLU of the projection discards half of it
(the projection is a linear map of it, so it holds nothing layer 3 lacks). SPEAR likewise takes a
late hidden layer (WavLM 21 of 24), not the training head's output.

Long inputs: the LSTM was trained on 160-frame (1.6 s) partials from a zero state, so it is
run in 160-frame windows with a hop of 80 frames, never over a whole long segment in one
pass: window 0 gives frames 0..159, window k >= 1 starts at frame 80 k and gives its last 80
frames. Every frame past the first 1.6 s is thus computed with 0.8 to 1.6 s of history,
inside the span the model was trained on, and all windows of a batch run as one LSTM batch of
160 steps (a long segment costs 2x the frames, but not thousands of sequential steps).
The LSTM is causal, so frames past an utterance's end never change its outputs.

Output: pairs of consecutive 100 Hz frames are averaged into one 50 Hz frame (an odd last
frame stands alone), 256-d. Frame count ``ceil((1 + S // 160) / 2) == 1 + S // 320``, the
same as ``crepe``'s at 50 Hz. The network runs in float32 on every device (an LSTM this small
gains nothing from autocast, and the power mel spans many decades).

Example::

    >>> import torch
    >>> from spear.models.teachers.resemblyzer import ResemblyzerTeacher, load_resemblyzer_state
    >>> t = ResemblyzerTeacher(load_resemblyzer_state())
    >>> out = t(torch.randn(2, 32000) * 0.1, torch.tensor([32000, 16000]))
    >>> out.embeddings.shape, out.num_frames.tolist(), t.frame_rate
    (torch.Size([2, 101, 256]), [101, 51], 50.0)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Teacher, hash_state_dict, make_version, read_weights
from .wheels import packaged_file

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40      # 25 ms / 10 ms / 40 bands (resemblyzer.hparams)
HIDDEN, NUM_LAYERS = 256, 3
WINDOW, WINDOW_HOP = 160, 80           # partials_n_frames (1.6 s); half-window hop
TARGET_DBFS = -30.0                    # audio_norm_target_dBFS (increase only)
PROJECTION_LAYER = NUM_LAYERS + 1
DEFAULT_LAYER = NUM_LAYERS


# ----------------------------------------------------------------------------- front end


def slaney_hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    lin = f / f_sp
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp_min(1e-10) / min_log_hz) / logstep, lin)


def slaney_mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                          f_max: float | None = None) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangles on the Slaney mel scale, each scaled to unit area
    (2 / bandwidth), as librosa's ``filters.mel`` defaults. Computed in float64."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = slaney_hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64))
    mel_f = slaney_mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))
    fdiff = mel_f[1:] - mel_f[:-1]
    ramps = mel_f.unsqueeze(1) - fft_freqs.unsqueeze(0)  # [n_mels + 2, n_freqs]
    lower = -ramps[:-2] / fdiff[:-1].unsqueeze(1)
    upper = ramps[2:] / fdiff[1:].unsqueeze(1)
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    return weights * (2.0 / (mel_f[2:] - mel_f[:-2])).unsqueeze(1)


class ResemblyzerMel(nn.Module):
    """Waveforms [B, S] + lengths -> 40-band mel power [B, T, 40] at 100 Hz (T = 1 + S // 160),
    after raising each utterance to -30 dBFS; frames past an utterance's end are not meaningful."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT, dtype=torch.float32), persistent=False)  # periodic
        self.register_buffer("fb", slaney_mel_filterbank(N_FFT, N_MELS, SAMPLE_RATE).float(), persistent=False)

    @staticmethod
    def num_frames(num_samples):
        return 1 + num_samples // HOP

    def settings(self) -> dict:
        return {"n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "mel": "slaney", "power": 2.0, "center": "zeros",
                "volume_dbfs": TARGET_DBFS, "increase_only": True}

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, S = wavs.shape
        valid = torch.arange(S, device=wavs.device).unsqueeze(0) < lengths.unsqueeze(1)
        x = torch.where(valid, wavs.float(), 0.0)  # the batch's padding becomes the zeros of center padding
        rms = torch.sqrt((x * x).sum(1) / lengths.clamp_min(1).float())
        target = 10.0 ** (TARGET_DBFS / 20.0)
        gain = torch.where(rms > 0, target / rms.clamp_min(1e-30), torch.ones_like(rms)).clamp_min(1.0)
        x = F.pad(x * gain.unsqueeze(1), (N_FFT // 2, N_FFT // 2))
        spec = torch.stft(x, N_FFT, HOP, N_FFT, self.window, center=False, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # [B, 201, T]
        return torch.matmul(self.fb, power).transpose(1, 2)  # [B, T, 40]


# ----------------------------------------------------------------------------- network


def resemblyzer_weights_path() -> Path:
    """``pretrained.pt`` of the installed ``resemblyzer`` wheel (the package is not imported)."""
    return packaged_file("resemblyzer", "pretrained.pt")


def load_resemblyzer_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The encoder's tensors (``lstm.*``, ``linear.*``) from ``pretrained.pt`` (or a folder holding one),
    read with ``torch.load(weights_only=True)``; default: the installed wheel's file."""
    p = Path(path).expanduser() if path is not None else resemblyzer_weights_path()
    dump = read_weights(p, "resemblyzer checkpoint", (".pt", ".pth"))
    state = dump.get("model_state", dump) if isinstance(dump, dict) else None
    expected = {f"lstm.{w}_l{k}" for k in range(NUM_LAYERS) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    expected |= {"linear.weight", "linear.bias"}
    if not isinstance(state, dict) or not expected <= set(state):
        raise ValueError(f"{p} is not resemblyzer's voice encoder: expected a dict with model_state holding "
                         f"{sorted(expected)[:3]}... (a 3-layer LSTM 40 -> 256 and a linear 256 -> 256)")
    state = {k: state[k].float() for k in sorted(expected)}
    shapes = {"lstm.weight_ih_l0": (4 * HIDDEN, N_MELS), "linear.weight": (HIDDEN, HIDDEN)}
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{p} is not resemblyzer's voice encoder: {k} has shape {tuple(state[k].shape)}, expected {shape}")
    return state


class ResemblyzerEncoder(nn.Module):
    """The voice encoder's LSTM as one single-layer LSTM per layer (so inner layers can be read) and its projection."""

    def __init__(self) -> None:
        super().__init__()
        self.lstms = nn.ModuleList(nn.LSTM(N_MELS if k == 0 else HIDDEN, HIDDEN, 1, batch_first=True)
                                   for k in range(NUM_LAYERS))
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def load_package_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load the package's names (``lstm.weight_ih_l{k}``) into the per-layer LSTMs."""
        ours = {"linear.weight": state["linear.weight"], "linear.bias": state["linear.bias"]}
        for k in range(NUM_LAYERS):
            for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                ours[f"lstms.{k}.{w}_l0"] = state[f"lstm.{w}_l{k}"]
        self.load_state_dict(ours, strict=True)

    def forward(self, mels: torch.Tensor, layer: int) -> torch.Tensor:
        """[N, T, 40] mel power -> [N, T, 256] output of ``layer`` (1..3 LSTM, 4 the normalised projection)."""
        x = mels
        for lstm in self.lstms[: min(layer, NUM_LAYERS)]:
            x, _ = lstm(x)
        if layer == PROJECTION_LAYER:
            x = F.relu(self.linear(x))
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x


def window_plan(num_frames: torch.Tensor) -> torch.Tensor:
    """Windows per utterance for ``num_frames`` 100 Hz frames: 1 + ceil(max(0, T - 160) / 80)."""
    extra = (num_frames - WINDOW).clamp_min(0)
    return 1 + (extra + WINDOW_HOP - 1) // WINDOW_HOP


class ResemblyzerTeacher(Teacher):
    """GE2E speaker encoder at one layer; 256-d at 50 Hz."""

    name = "resemblyzer"
    frame_rate = 50.0
    dim = HIDDEN

    def __init__(self, state: dict[str, torch.Tensor], layer: int | None = None) -> None:
        super().__init__()
        layer = DEFAULT_LAYER if layer is None else layer
        if not 1 <= layer <= PROJECTION_LAYER:
            raise ValueError(f"resemblyzer: layer {layer} out of range: 1..{NUM_LAYERS} are the LSTM layers, "
                             f"{PROJECTION_LAYER} the projection (default {DEFAULT_LAYER})")
        self.layer = layer
        self.mel = ResemblyzerMel()
        self.encoder = ResemblyzerEncoder()
        self.encoder.load_package_state(state)
        if layer < PROJECTION_LAYER:
            self.encoder.lstms = self.encoder.lstms[:layer]  # layers above the chosen one are never run
        settings = {"frontend": self.mel.settings(), "window": [WINDOW, WINDOW_HOP], "pool": 2}
        self.version = make_version(self.name, hash_state_dict(state), layer, settings)
        self.eval()  # BatchNorm / LSTM inference behaviour even when built without build_teacher

    def num_frames_for(self, num_samples):
        return 1 + num_samples // (2 * HOP)

    def frames_100hz(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, S] + lengths -> [B, max(1 + S // 160), 256]: the layer's output at every 100 Hz mel frame,
        windowed as the module docstring says (frames past an utterance's end are not meaningful)."""
        with torch.autocast(wavs.device.type, enabled=False):
            mels = self.mel(wavs.float(), lengths)
            B, T, _ = mels.shape
            nf = ResemblyzerMel.num_frames(lengths)
            n_win = window_plan(nf)                                      # [B]
            offsets = torch.cumsum(n_win, 0) - n_win                     # first window row of each utterance
            b_idx = torch.repeat_interleave(torch.arange(B, device=mels.device), n_win)
            k_idx = torch.arange(int(n_win.sum()), device=mels.device) - offsets[b_idx]
            starts = torch.where(k_idx == 0, 0, k_idx * WINDOW_HOP)      # window k >= 1 starts at 80 k
            span = int(starts.max()) + WINDOW
            mels = F.pad(mels, (0, 0, 0, max(0, span - T)))
            t_in = starts.unsqueeze(1) + torch.arange(WINDOW, device=mels.device).unsqueeze(0)
            windows = mels[b_idx.unsqueeze(1), t_in]                     # [N, 160, 40]
            out = self.encoder(windows, self.layer)                     # [N, 160, 256]
            # Frame t comes from window 0 if t < 160, else window k = (t - 160) // 80 + 1 at position t - 80 k.
            t = torch.arange(T, device=mels.device)
            k = torch.where(t < WINDOW, 0, (t - WINDOW) // WINDOW_HOP + 1)
            pos = t - k * WINDOW_HOP
            k = torch.minimum(k.unsqueeze(0), n_win.unsqueeze(1) - 1)    # past an utterance's end: any valid row
            rows = offsets.unsqueeze(1) + k                              # [B, T]
            return out[rows, pos.unsqueeze(0).expand(B, T)]

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feats = self.frames_100hz(wavs, lengths)  # [B, T100, D]
        B, T, D = feats.shape
        nf = ResemblyzerMel.num_frames(lengths)
        T50 = (T + 1) // 2
        feats = F.pad(feats, (0, 0, 0, 2 * T50 - T))
        valid = (torch.arange(2 * T50, device=feats.device).unsqueeze(0) < nf.unsqueeze(1)).view(B, T50, 2, 1)
        pairs = feats.view(B, T50, 2, D)
        return (pairs * valid).sum(2) / valid.sum(2).clamp_min(1)


def build_resemblyzer(path: str | Path | None, layer: int | None) -> ResemblyzerTeacher:
    """The teacher from a weights file or folder (None: the installed wheel's ``pretrained.pt``)."""
    return ResemblyzerTeacher(load_resemblyzer_state(path), layer)
