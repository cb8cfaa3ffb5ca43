"""A SPEAR student behind the HEAR 2021 API (hearbenchmark.com), plus an s3prl-style upstream.

HEAR's evaluation kit imports a module and calls three functions::

    model = load_model(model_file_path)                      # a torch.nn.Module
    emb, ts = get_timestamp_embeddings(audio, model)         # audio [n_sounds, n_samples]
    scene = get_scene_embeddings(audio, model)

``audio`` is float32 in [-1, 1] at ``model.sample_rate`` (16 kHz), every sound the same
length (the kit pads); the module must batch internally. Here:

- ``model_file_path`` is an exported student directory (local or s3://, see
  :func:`spear.stages.artefacts.export_student`);
- embeddings come from one choice of layer (``layer`` keyword of :func:`load_model`, which
  the kit's ``--model-options '{"layer": 6}'`` passes on): ``"final"`` (default) is the
  encoder output that the distillation heads read (for Zipformer2 every channel up to the
  widest stack, taken from the last stack that has it); an int ``k`` is encoder layer ``k``
  (1-based, as in the evaluation report); ``"all"`` concatenates every layer;
- timestamp embeddings are the frames of that layer at the student's frame rate (50 Hz for
  the presets); ``timestamps`` (ms) are the frame centres: output frame ``i`` is centred on
  fbank frame ``c = subsampling * i + (receptive_field - 1) // 2`` (the centre of the input
  frames its conv subsampling sees, as the encoder's ``output_frame_mask``), whose 25 ms
  window is centred at ``c * 10 + 12.5`` ms; so ``42.5 + 20 * i`` ms at 50 Hz, spaced
  ``1000 / frame_rate``;
- the scene embedding is the mean of the timestamp embeddings over time; or, for a post-trained
  export (``spear posttrain``), one attribute's utterance embedding (``attribute`` keyword of
  :func:`load_model`, e.g. ``--model-options '{"attribute": "speaker"}'``): the attribute head's
  pooling over the whole sound, with the head's own size; timestamp embeddings stay the encoder's
  frames of ``layer``.

Pick ``layer`` from the evaluation report (the layer its probes chose on validation for the
tasks that resemble yours, marked "chosen" in the per-task tables). The module is plain torch (no Ray), so HEAR's runner can import it as
``spear.evaluation.hear``.

Example::

    >>> import tempfile, torch
    >>> from spear.models.student import build_encoder
    >>> from spear.stages.artefacts import export_student
    >>> from spear.evaluation import hear
    >>> d = tempfile.mkdtemp(); _ = export_student(build_encoder("zipformer2", "tiny"), d)
    >>> model = hear.load_model(d)
    >>> emb, ts = hear.get_timestamp_embeddings(torch.zeros(2, 16000), model)
    >>> emb.shape, ts[0, :2].tolist(), hear.get_scene_embeddings(torch.zeros(2, 16000), model).shape
    (torch.Size([2, 45, 64]), [42.5, 62.5], torch.Size([2, 64]))
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from spear.models.posttrain import PostTrainModel
from spear.models.student import StudentModel
from spear.stages.artefacts import load_posttrained, load_student

LayerChoice = Union[int, str]
MAX_BATCH_SECONDS = 120.0  # audio seconds per forward pass (bounds attention memory on long sounds)


def _layer_dims(student: StudentModel, layer: LayerChoice) -> int:
    if layer == "final":
        return int(student.encoder.output_dim)
    if layer == "all":
        return int(sum(student.layer_dims))
    return int(student.layer_dims[int(layer) - 1])


class HearModel(nn.Module):
    """A loaded student with the attributes HEAR asks for.

    ``sample_rate`` (16000), ``scene_embedding_size`` and ``timestamp_embedding_size`` (the
    chosen layer's dimension), ``frame_rate`` (Hz) and ``layer``. With ``posttrained`` (the
    :class:`~spear.models.posttrain.PostTrainModel` around ``student``) and ``attribute``, the scene
    embedding is that attribute's embedding and ``scene_embedding_size`` its size.
    """

    sample_rate = StudentModel.sample_rate  # 16 kHz

    def __init__(self, student: StudentModel, layer: LayerChoice = "final",
                 posttrained: Optional[PostTrainModel] = None, attribute: Optional[str] = None):
        super().__init__()
        if (posttrained is None) != (attribute is None):
            raise ValueError("an attribute scene embedding needs both posttrained and attribute")
        if posttrained is not None and attribute not in posttrained.attributes:
            raise ValueError(f"unknown attribute {attribute!r}; this post-trained model has "
                             f"{', '.join(posttrained.attributes)}")
        if isinstance(layer, str) and layer not in ("final", "all"):
            layer = int(layer)  # "6" from a command line
        if isinstance(layer, int) and not 1 <= layer <= student.num_layers:
            raise ValueError(f"layer {layer} out of range: the student has layers 1..{student.num_layers}")
        self.student = student.eval()
        self.layer: LayerChoice = layer
        self.frame_rate = float(student.frame_rate)
        enc, opts = student.encoder, student.fbank.frame_opts
        # Centre (ms) of output frame 0; later frames follow every 1000 / frame_rate ms.
        self.first_timestamp_ms = ((enc.receptive_field - 1) // 2 * opts.frame_shift_ms + opts.frame_length_ms / 2)
        self.timestamp_embedding_size = _layer_dims(student, layer)
        self.posttrained = None if posttrained is None else posttrained.eval()
        self.attribute = attribute
        self.scene_embedding_size = (self.timestamp_embedding_size if posttrained is None
                                     else int(posttrained.attributes[attribute].dim))

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @torch.no_grad()
    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """[n_sounds, n_samples] -> [n_sounds, n_frames, D] of the chosen layer (batched by duration)."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be [n_sounds, n_samples], got shape {tuple(audio.shape)}")
        n, S = audio.shape
        num_frames = int(self.student.num_frames_for(S))
        out = torch.zeros(n, num_frames, self.timestamp_embedding_size, device=self.device)
        if n == 0 or num_frames == 0:
            return out
        per_batch = max(1, int(MAX_BATCH_SECONDS * self.sample_rate // max(S, 1)))
        lengths = torch.full((n,), S, dtype=torch.long)
        for start in range(0, n, per_batch):
            wavs = audio[start:start + per_batch].to(self.device, torch.float32)
            feats = self.student.features(wavs, lengths[: len(wavs)], autocast_dtype=torch.bfloat16)
            if self.layer == "final":
                y = feats.final
            elif self.layer == "all":
                y = torch.cat(feats.layers, dim=-1)
            else:
                y = feats.layers[int(self.layer) - 1]
            out[start:start + len(wavs)] = y[:, :num_frames].float()
        return out

    @torch.no_grad()
    def attribute_embeddings(self, audio: torch.Tensor) -> torch.Tensor:
        """[n_sounds, n_samples] -> [n_sounds, scene_embedding_size]: the post-trained attribute's
        embedding of every sound (batched by duration)."""
        if self.posttrained is None:
            raise ValueError("this model serves no attribute embedding (load_model(..., attribute=...) on a "
                             "post-trained export)")
        if audio.dim() != 2:
            raise ValueError(f"audio must be [n_sounds, n_samples], got shape {tuple(audio.shape)}")
        n, S = audio.shape
        out = torch.zeros(n, self.scene_embedding_size, device=self.device)
        per_batch = max(1, int(MAX_BATCH_SECONDS * self.sample_rate // max(S, 1)))
        lengths = torch.full((n,), S, dtype=torch.long)
        for start in range(0, n, per_batch):
            wavs = audio[start:start + per_batch].to(self.device, torch.float32)
            emb = self.posttrained(wavs, lengths[: len(wavs)], attributes=[self.attribute]).embeddings
            out[start:start + len(wavs)] = emb[self.attribute].float()
        return out

    def timestamps(self, n_sounds: int, n_frames: int) -> torch.Tensor:
        """Frame centres in ms, [n_sounds, n_frames]."""
        t = self.first_timestamp_ms + torch.arange(n_frames, dtype=torch.float32, device=self.device) * (
            1000.0 / self.frame_rate)
        return t.unsqueeze(0).expand(n_sounds, n_frames).contiguous()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.frames(audio)


def load_model(model_file_path: str = "", layer: LayerChoice = "final",
               device: Optional[Union[str, torch.device]] = None, attribute: Optional[str] = None) -> HearModel:
    """HEAR ``load_model``: the exported student at ``model_file_path`` (on CUDA when present).

    ``attribute``: a post-trained export's attribute (``speaker``, ...) whose utterance embedding is the
    scene embedding (the folder must be a ``spear posttrain`` export)."""
    if not model_file_path:
        raise ValueError("model_file_path must be an exported SPEAR student directory (see `spear export`)")
    if attribute is None:
        return HearModel(load_student(model_file_path, device=device), layer=layer).eval()
    try:
        model = load_posttrained(model_file_path, device=device)
    except FileNotFoundError as exc:
        raise ValueError(f"attribute={attribute!r} needs a post-trained export (`spear posttrain`): {exc}") from None
    return HearModel(model.student, layer=layer, posttrained=model, attribute=attribute).eval()


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """HEAR ``get_timestamp_embeddings``: (embeddings [n_sounds, n_timestamps, D] float32,
    timestamps [n_sounds, n_timestamps] in ms at frame centres)."""
    emb = model.frames(audio)
    return emb, model.timestamps(emb.shape[0], emb.shape[1])


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """HEAR ``get_scene_embeddings``: [n_sounds, D], the mean of the timestamp embeddings
    over time (zeros for sounds too short for one frame), or the post-trained attribute's embedding
    when the model was loaded with ``attribute``."""
    if model.attribute is not None:
        return model.attribute_embeddings(audio)
    emb = model.frames(audio)
    if emb.shape[1] == 0:
        return emb.new_zeros(emb.shape[0], emb.shape[2])
    return emb.mean(dim=1)


class SpearUpstream(nn.Module):
    """An s3prl-style upstream: ``forward(wavs: list of 1-d 16 kHz tensors) -> {"hidden_states":
    [every layer, each [B, T, D_l]], "last_hidden_state": the encoder output, "lengths": [B]}``.

    Frames past each utterance's ``lengths`` are zeros. ``get_downsample_rates(key)`` is the
    input samples per output frame (320 at 50 Hz), as s3prl expects.

    Example::

        upstream = SpearUpstream("runs/student")
        out = upstream([torch.randn(16000), torch.randn(8000)])
        len(out["hidden_states"]), out["hidden_states"][0].shape
    """

    def __init__(self, ckpt: Union[str, StudentModel], device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        self.student = ckpt if isinstance(ckpt, StudentModel) else load_student(ckpt, device=device)

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        return int(round(StudentModel.sample_rate / self.student.frame_rate))

    @torch.no_grad()
    def forward(self, wavs: Sequence[torch.Tensor]) -> dict[str, object]:
        device = next(self.student.parameters()).device
        lengths = torch.tensor([int(w.shape[-1]) for w in wavs], dtype=torch.long)
        padded = torch.zeros(len(wavs), int(lengths.max()) if len(wavs) else 0, device=device)
        for i, w in enumerate(wavs):
            padded[i, : w.shape[-1]] = w.reshape(-1).to(device, torch.float32)
        feats = self.student.features(padded, lengths)
        return {"hidden_states": list(feats.layers), "last_hidden_state": feats.final, "lengths": feats.lengths}
