"""WavLM and HuBERT teachers from checkpoints in Hugging Face format.

A checkpoint is a directory (local, or an ``s3://`` prefix fetched into the local cache)
with ``config.json`` and ``model.safetensors`` (sharded safetensors and
``pytorch_model.bin`` also load: the latter through ``torch.load(weights_only=True)``
inside transformers). ``trust_remote_code`` is never used: only transformers' own
``WavLMModel`` / ``HubertModel`` classes run.

Layer ``k`` is the output of transformer layer ``k`` (1-based; 0 = the input of the first
layer), i.e. ``hidden_states[k]`` of the model's forward, without the final layer norm.
Layers above ``k`` are dropped at load time, so they cost nothing. Default (``layer`` None):
21 for a 24-layer WavLM (SPEAR's WavLM Large layer 21), else the last layer.

Input normalisation: ``preprocessor_config.json``'s ``do_normalize`` when the directory
has one; otherwise the fairseq convention (models with ``feat_extract_norm == "layer"``,
WavLM/HuBERT Large, were trained on per-utterance zero-mean unit-variance audio; "group"
norm Base models on raw audio). Normalisation uses each utterance's valid samples only.

Padding: the conv feature encoder of ``feat_extract_norm == "group"`` models (WavLM Base,
HuBERT Base) normalises every channel over the whole time axis, so padding would leak
into every frame. Those models run one utterance at a time at its exact length (the
duration batching of the teacher stage sorts by length, so this costs only GPU
occupancy). ``"layer"`` models run batched with an attention mask and are padding-invariant.

Frame count: the conv feature encoder's formula, L -> (L - k) // s + 1 per layer (50 Hz).

Example::

    >>> from spear.models.teachers.hf import load_hf_teacher
    >>> teacher = load_hf_teacher("wavlm", "/models/wavlm-large")  # doctest: +SKIP
    >>> teacher.dim, teacher.layer, teacher.frame_rate  # doctest: +SKIP
    (1024, 21, 50.0)
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from .base import Teacher, conv_frames, file_sha256, make_version

HF_FILE_PATTERNS = ("config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _model_class(kind: str):
    if kind == "wavlm":
        from transformers import WavLMModel  # heavy: imported only for the HF teachers

        return WavLMModel
    if kind == "hubert":
        from transformers import HubertModel  # heavy: imported only for the HF teachers

        return HubertModel
    raise ValueError(f"not a Hugging Face teacher kind: {kind!r} (wavlm | hubert)")


def default_layer(kind: str, num_layers: int) -> int:
    if kind == "wavlm" and num_layers == 24:
        return 21
    return num_layers


class HFTeacher(Teacher):
    """A WavLM / HuBERT model truncated after ``layer``; see the module docstring."""

    frame_rate = 50.0

    def __init__(self, kind: str, model: torch.nn.Module, layer: int, do_normalize: bool, weights_hash: str):
        super().__init__()
        cfg = model.config
        n_layers = len(model.encoder.layers)
        if not 0 <= layer <= n_layers:
            raise ValueError(f"{kind}: layer {layer} out of range: the model has {n_layers} transformer layers (0..{n_layers})")
        self.name, self.layer, self.do_normalize = kind, layer, do_normalize
        self.per_utterance = cfg.feat_extract_norm == "group"
        self.conv_kernel, self.conv_stride = tuple(cfg.conv_kernel), tuple(cfg.conv_stride)
        self.frame_rate = self.sample_rate / math.prod(self.conv_stride)
        self.dim = int(cfg.hidden_size)
        # Keep the layers up to `layer` (at least one, whose input is layer 0's output).
        model.encoder.layers = model.encoder.layers[: max(layer, 1)]
        self.model = model.eval().requires_grad_(False)
        settings = {"do_normalize": do_normalize, "per_utterance": self.per_utterance}
        self.version = make_version(kind, weights_hash, layer, settings)

    def num_frames_for(self, num_samples):
        return conv_frames(num_samples, self.conv_kernel, self.conv_stride)

    def _run(self, wavs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        layers = self.model.encoder.layers
        if self.layer == 0:
            def hook(_mod, args, kwargs):
                captured.append(args[0] if args else kwargs["hidden_states"])
            handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        else:
            def hook(_mod, _args, output):
                captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            handle = layers[self.layer - 1].register_forward_hook(hook)
        try:
            with warnings.catch_warnings():
                # WavLM passes a bool padding mask with a float position bias; torch warns on every call.
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
                self.model(wavs, attention_mask=attention_mask)
        finally:
            handle.remove()
        return captured[0]

    def _normalize(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # As transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm: stats over valid samples only.
        mask = (torch.arange(wavs.shape[1], device=wavs.device).unsqueeze(0) < lengths.unsqueeze(1)).float()
        n = lengths.clamp_min(1).unsqueeze(1).float()
        mean = (wavs * mask).sum(1, keepdim=True) / n
        var = (((wavs - mean) * mask) ** 2).sum(1, keepdim=True) / n
        return (wavs - mean) / torch.sqrt(var + 1e-7) * mask

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.do_normalize:
            with torch.autocast(wavs.device.type, enabled=False):
                wavs = self._normalize(wavs, lengths)
        if not self.per_utterance:
            mask = (torch.arange(wavs.shape[1], device=wavs.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
            return self._run(wavs, mask)
        outs = [self._run(wavs[b: b + 1, : int(n)], None)[0] for b, n in enumerate(lengths.tolist())]
        return torch.nn.utils.rnn.pad_sequence(outs, batch_first=True)


def load_hf_teacher(kind: str, local_dir: str | Path, layer: int | None = None) -> HFTeacher:
    """Load a WavLM (``kind="wavlm"``) or HuBERT (``"hubert"``) teacher from a local HF-format directory."""
    d = Path(local_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{kind} checkpoint {d}: no config.json (expected a Hugging Face model directory)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != kind:
        raise ValueError(f"checkpoint {d} has model_type {cfg.get('model_type')!r}, but the teacher kind is {kind!r}")
    weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not weights:
        raise FileNotFoundError(f"{kind} checkpoint {d}: no model.safetensors or pytorch_model.bin")
    model = _model_class(kind).from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    model = model.float()  # half-precision checkpoints: CPU runs float32, CUDA uses autocast
    n_layers = int(model.config.num_hidden_layers)
    if layer is None:
        layer = default_layer(kind, n_layers)
    elif layer < 0:
        layer += n_layers + 1
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        do_normalize = bool(json.loads(pre.read_text()).get("do_normalize", False))
    else:
        do_normalize = model.config.feat_extract_norm == "layer"
    return HFTeacher(kind, model, layer, do_normalize, file_sha256([cfg_path, *weights]))
