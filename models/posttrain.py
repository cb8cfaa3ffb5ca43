"""Post-training one encoder into several utterance-level embeddings (speaker, meaning, counting).

Pure torch: tensors and plain typed arguments in, tensors out (the Ray Train loop, the data, the
checkpoints and the CLI live above). The pieces, from frames to losses:

- :class:`LayerWeighting`: a learned softmax weighting of the encoder's layers (each layer
  normalised per frame, narrower layers zero-padded to the widest), as SUPERB's weighted sum;
- :class:`AttentiveStatsPooling`: ECAPA-TDNN's channel-wise attentive statistics pooling with
  global context (the utterance's masked mean and std join every frame's attention input), masked
  so that an utterance's embedding does not depend on its padding or on the batch;
- :class:`AttributeHead`: layer weighting -> pooling -> linear projection to the embedding size;
- the losses: :class:`AAMSoftmax` (additive angular margin, ArcFace: the true class's logit is
  ``s * cos(theta + m)``) for speakers, :class:`SemanticAlignmentLoss` (cosine or MSE to a target
  sentence embedding plus a symmetric in-batch InfoNCE term, as SAMU-XLSR / SONAR-style
  alignment) for meaning, :class:`CountingLoss` (per counting task a classifier over counts and/or
  a regression of the count) for SpectCount-style synthetic tasks;
- weight-free semantic targets: :func:`pivot_text_embedding` (feature hashing of a pivot-language
  translation: translations of one sentence share a target) and :func:`masked_mean` (a sentence
  encoder's mean pooling, for targets from a real text encoder);
- :class:`PostTrainModel`: a student (or any encoder with ``features(wavs, lengths)``) with one head
  per configured attribute (:class:`AttributeSpec`), the freezing mode (``frozen``, ``top`` N layers
  trainable, ``full``), parameter groups with a lower encoder learning rate, ``forward`` ->
  embeddings per attribute plus the frame features, and ``loss(batch)``: each attribute's loss on
  the rows that carry its label, weighted per attribute.

Example::

    >>> import torch
    >>> from spear.models.student import build_encoder, build_student, export_fields, export_state
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    >>> student = build_student(export_fields(enc), export_state(enc), device="cpu")
    >>> model = PostTrainModel(student, [AttributeSpec("speaker", "speaker", dim=16, num_classes=4),
    ...                                  AttributeSpec("count", "counting", dim=8, tasks={"tones": 5})],
    ...                        freeze="top", trainable_layers=2)
    >>> wavs, lengths = torch.randn(3, 16000) * 0.1, torch.tensor([16000, 12000, 8000])
    >>> out = model(wavs, lengths)
    >>> {k: tuple(v.shape) for k, v in out.embeddings.items()}
    {'speaker': (3, 16), 'count': (3, 8)}
    >>> batch = PostTrainBatch(wavs, lengths,
    ...     labels={"speaker": torch.tensor([0, 2, -1]), "count": torch.tensor([-1, -1, 3])},
    ...     tasks={"count": torch.tensor([0, 0, 0])})
    >>> res = model.loss(batch)
    >>> res.rows, res.loss.requires_grad
    ({'speaker': 2, 'count': 1}, True)
    >>> [g["name"] for g in model.param_groups(head_lr=1e-3, encoder_lr=1e-4)]
    ['heads', 'encoder']
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spear.models.student.base import length_mask
from spear.models.student.export import StudentFeatures

#: The attribute kinds a head can be trained for.
ATTRIBUTE_KINDS = ("speaker", "semantic", "counting")
#: How much of the encoder trains: none, the top ``trainable_layers`` layers, or all of it.
FREEZE_MODES = ("frozen", "top", "full")
#: Losses a counting attribute can use.
COUNTING_LOSSES = ("classify", "regress", "both")
#: Alignment terms of a semantic attribute.
ALIGN_LOSSES = ("cosine", "mse")


# ----------------------------------------------------------------------------- pooling


class LayerWeighting(nn.Module):
    """A learned softmax-weighted sum of encoder layers: list of [B, T, D_l] -> [B, T, max D_l].

    Each layer is normalised per frame (zero mean, unit variance over its channels, no learned
    affine) so that no layer dominates by scale, then zero-padded to the widest layer (Zipformer2's
    stacks differ in width). Every operation is per frame, so padding frames cannot leak into valid
    ones. The weights start uniform.

    >>> import torch
    >>> w = LayerWeighting([4, 6])
    >>> w([torch.randn(2, 5, 4), torch.randn(2, 5, 6)]).shape, w.weights().tolist()
    (torch.Size([2, 5, 6]), [0.5, 0.5])
    """

    def __init__(self, layer_dims: Sequence[int], normalize: bool = True):
        super().__init__()
        if not layer_dims or min(layer_dims) < 1:
            raise ValueError(f"layer_dims must be a non-empty list of positive widths, got {list(layer_dims)}")
        self.layer_dims = [int(d) for d in layer_dims]
        self.dim = max(self.layer_dims)
        self.normalize = normalize
        self.logits = nn.Parameter(torch.zeros(len(self.layer_dims)))

    def weights(self) -> torch.Tensor:
        """The current layer weights [L] (sum to 1)."""
        return self.logits.softmax(0)

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(layers) != len(self.layer_dims):
            raise ValueError(f"expected {len(self.layer_dims)} layers, got {len(layers)}")
        w = self.weights()
        out = None
        for i, (x, d) in enumerate(zip(layers, self.layer_dims)):
            if x.shape[-1] != d:
                raise ValueError(f"layer {i}: expected width {d}, got {tuple(x.shape)}")
            x = x.float()
            if self.normalize:
                x = F.layer_norm(x, (d,))
            if d < self.dim:
                x = F.pad(x, (0, self.dim - d))
            out = w[i] * x if out is None else out + w[i] * x
        return out


_TIME_FEATURES = 4


def _relative_time(lengths: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, 4] features of each frame's relative position r = (t + 0.5) / length in the utterance:
    r, r^2, sin(pi r), cos(pi r) (past the length: anything, those frames are masked)."""
    r = (torch.arange(T, device=lengths.device, dtype=dtype).unsqueeze(0) + 0.5) / lengths.clamp_min(1).unsqueeze(1)
    return torch.stack([r, r.square(), torch.sin(math.pi * r), torch.cos(math.pi * r)], dim=-1)


class AttentiveStatsPooling(nn.Module):
    """Channel-wise attentive statistics pooling with global context (ECAPA-TDNN), masked.

    ``forward(x [B, T, D], lengths [B]) -> [B, 2 D]``: the attention-weighted mean and standard
    deviation of every channel over the valid frames. The attention of frame t and channel c is
    ``v_c . tanh(W [x_t, mean, std] + b) + k_c`` (``mean``, ``std``: the utterance's plain
    statistics over its valid frames), softmaxed over the valid frames only. No batch norm: it
    would make an utterance's embedding depend on the batch. An utterance with no frames pools to
    zeros.

    Pooled statistics do not see the order of frames: "which of two tones is higher" has no answer
    in them unless the encoder writes the order into its frames. ``time_context`` adds each frame's
    relative position in its utterance (r = (t + 0.5) / length: r, r^2, sin pi r, cos pi r) to the
    attention's input, so that some channels can pool the beginning and others the end.

    >>> import torch
    >>> pool = AttentiveStatsPooling(8, hidden=16)
    >>> pool(torch.randn(2, 10, 8), torch.tensor([10, 4])).shape
    torch.Size([2, 16])
    """

    def __init__(self, dim: int, hidden: int = 128, global_context: bool = True, eps: float = 1e-5,
                 time_context: bool = False):
        super().__init__()
        self.dim, self.global_context, self.eps, self.time_context = dim, global_context, eps, time_context
        extra = _TIME_FEATURES if time_context else 0
        self.attention = nn.Sequential(nn.Linear((3 * dim if global_context else dim) + extra, hidden), nn.Tanh(),
                                       nn.Linear(hidden, dim))

    @property
    def output_dim(self) -> int:
        return 2 * self.dim

    def _stats(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted mean and std over time; ``w`` [B, T, 1 or D] sums to 1 over the valid frames."""
        mean = (w * x).sum(1)
        var = (w * x.square()).sum(1) - mean.square()
        return mean, var.clamp_min(self.eps).sqrt()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"expected [B, T, {self.dim}] frames, got {tuple(x.shape)}")
        lengths = torch.as_tensor(lengths, device=x.device).long()
        empty = lengths <= 0
        # an empty utterance attends to its (zero) frame 0 so nothing divides by zero; zeroed below
        mask = length_mask(lengths, T)
        if T:
            mask[:, 0] |= empty
        m = mask.unsqueeze(-1).to(x.dtype)
        x = x * m  # frames past the length never count, whatever they hold
        if self.global_context:
            n = m.sum(1, keepdim=True).clamp_min(1.0)
            mean, std = self._stats(x, m / n)
            ctx = torch.cat([x, mean.unsqueeze(1).expand(B, T, D), std.unsqueeze(1).expand(B, T, D)], dim=-1)
        else:
            ctx = x
        if self.time_context:
            ctx = torch.cat([ctx, _relative_time(lengths, T, x.dtype)], dim=-1)
        scores = self.attention(ctx).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        alpha = scores.softmax(dim=1)
        mean, std = self._stats(x, alpha)
        return torch.cat([mean, std], dim=-1) * (~empty).unsqueeze(-1).to(x.dtype)


class AttributeHead(nn.Module):
    """One attribute's embedding: :class:`LayerWeighting` -> :class:`AttentiveStatsPooling` -> linear.

    ``forward(layers: list of [B, T, D_l], lengths [B]) -> [B, dim]``.

    >>> import torch
    >>> head = AttributeHead([4, 6], dim=3, pool_hidden=8)
    >>> head([torch.randn(2, 7, 4), torch.randn(2, 7, 6)], torch.tensor([7, 5])).shape
    torch.Size([2, 3])
    """

    def __init__(self, layer_dims: Sequence[int], dim: int, pool_hidden: int = 128, time_context: bool = False):
        super().__init__()
        self.weighting = LayerWeighting(layer_dims)
        self.pooling = AttentiveStatsPooling(self.weighting.dim, hidden=pool_hidden, time_context=time_context)
        self.projection = nn.Linear(self.pooling.output_dim, dim)
        self.dim = dim

    def forward(self, layers: Sequence[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pooling(self.weighting(layers), lengths))


# ----------------------------------------------------------------------------- losses


def margin_warmup(step: int, margin: float, warmup_steps: int, start_step: int = 0) -> float:
    """A linear warm-up of the AAM margin: 0 until ``start_step``, ``margin`` from
    ``start_step + warmup_steps`` on (speaker recipes raise the margin over the first epochs so that
    the classes can separate before they are pushed apart).

    >>> margin_warmup(50, 0.2, 100), margin_warmup(500, 0.2, 100), margin_warmup(5, 0.2, 0)
    (0.1, 0.2, 0.2)
    """
    if warmup_steps <= 0:
        return float(margin) if step >= start_step else 0.0
    return float(margin) * min(max((step - start_step) / warmup_steps, 0.0), 1.0)


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace) over ``num_classes`` class centres.

    logits = ``scale * cos(theta_j)`` for every class j, but ``scale * cos(theta_y + margin)`` for
    the true class y (theta: the angle between the embedding and a class centre, both L2-normalised).
    Where ``theta_y + margin`` would pass pi, ``cos(theta_y) - margin * sin(margin)`` is used instead
    so that the logit keeps falling with the angle (the usual ArcFace guard). Defaults follow the
    speaker-verification recipes (wespeaker, speechbrain): scale 30-32, margin 0.2.

    ``forward(emb [B, D], labels [B], margin=None) -> mean cross-entropy``; ``margin`` overrides the
    configured one for this call (a warm-up: :func:`margin_warmup`). ``logits(emb, labels=None)``:
    with ``labels`` the margined logits, without them the plain ``scale * cos`` (for accuracy).

    >>> import torch
    >>> aam = AAMSoftmax(4, 3, margin=0.2, scale=30.0)
    >>> loss = aam(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.shape, bool(loss > 0)
    (torch.Size([]), True)
    """

    def __init__(self, dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"AAM softmax needs at least 2 classes, got num_classes={num_classes}")
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.margin, self.scale = float(margin), float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """cos(theta) [B, C] between the embeddings and the class centres."""
        return F.linear(F.normalize(emb.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))

    def logits(self, emb: torch.Tensor, labels: Optional[torch.Tensor] = None,
               margin: Optional[float] = None) -> torch.Tensor:
        cos = self.cosine(emb)
        if labels is None:
            return self.scale * cos
        m = self.margin if margin is None else float(margin)
        cos_y = cos.gather(1, labels.view(-1, 1)).clamp(-1.0 + 1e-7, 1.0 - 1e-7)
        sin_y = (1.0 - cos_y.square()).sqrt()
        margined = cos_y * math.cos(m) - sin_y * math.sin(m)  # cos(theta + m)
        # past theta = pi - m, cos(theta + m) would rise again: continue linearly instead
        margined = torch.where(cos_y > math.cos(math.pi - m), margined, cos_y - m * math.sin(m))
        return self.scale * cos.scatter(1, labels.view(-1, 1), margined)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, margin: Optional[float] = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(emb, labels, margin), labels)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.05,
             groups: Optional[torch.Tensor] = None, symmetric: bool = True) -> torch.Tensor:
    """In-batch contrastive loss between row i of ``queries`` and row i of ``keys`` [B, D] (cosine
    similarities / ``temperature``). Rows of the same ``groups`` id (e.g. translations of one sentence,
    which share a target) are not each other's negatives; ``symmetric`` averages both directions.

    >>> import torch
    >>> x = torch.eye(4)
    >>> bool(info_nce(x, x, 0.05) < 1e-6), bool(info_nce(x, x.roll(1, 0), 0.05) > 10)
    (True, True)
    """
    q, k = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    sim = q @ k.T / temperature
    if groups is not None:
        same = groups.view(-1, 1) == groups.view(1, -1)
        same.fill_diagonal_(False)
        sim = sim.masked_fill(same, float("-inf"))
    target = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(sim, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(sim.T, target))
    return loss


class SemanticAlignmentLoss(nn.Module):
    """Alignment of speech embeddings with target sentence embeddings [B, D] (SAMU-XLSR / SONAR style).

    loss = align + ``contrastive_weight`` * :func:`info_nce`, where align is ``1 - cos`` (``cosine``)
    or the mean squared error (``mse``; SONAR's speech encoders regress the text embedding) averaged
    over the rows. The contrastive term keeps embeddings of different sentences apart; without
    ``groups``, rows with identical targets count as one sentence.

    >>> import torch
    >>> t = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    >>> loss = SemanticAlignmentLoss("cosine", contrastive_weight=0.0)
    >>> abs(float(loss(t, t))) < 1e-5, bool(loss(-t, t) > 1.9)
    (True, True)
    """

    def __init__(self, align: str = "cosine", contrastive_weight: float = 1.0, temperature: float = 0.05):
        super().__init__()
        if align not in ALIGN_LOSSES:
            raise ValueError(f"align must be one of {ALIGN_LOSSES}, got {align!r}")
        if contrastive_weight < 0 or temperature <= 0:
            raise ValueError(f"need contrastive_weight >= 0 and temperature > 0, got {contrastive_weight}, "
                             f"{temperature}")
        self.align, self.contrastive_weight, self.temperature = align, float(contrastive_weight), float(temperature)

    def forward(self, emb: torch.Tensor, targets: torch.Tensor, groups: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        if emb.shape != targets.shape:
            raise ValueError(f"semantic embeddings {tuple(emb.shape)} and targets {tuple(targets.shape)} differ")
        emb, targets = emb.float(), targets.float()
        if self.align == "cosine":
            loss = (1.0 - F.cosine_similarity(emb, targets, dim=-1)).mean()
        else:
            loss = F.mse_loss(emb, targets)
        if self.contrastive_weight and len(emb) > 1:
            if groups is None:
                groups = torch.unique(targets, dim=0, return_inverse=True)[1]
            loss = loss + self.contrastive_weight * info_nce(emb, targets, self.temperature, groups)
        return loss


class CountingLoss(nn.Module):
    """Readouts of a counting embedding: per task a classifier over its counts and/or a count regression.

    ``tasks`` maps each task name to its number of classes (labels 0 .. n-1; a count task's labels are
    counts minus its minimum, a comparison task has 2). ``mode``: ``classify`` (cross-entropy),
    ``regress`` (smooth L1 on the label scaled to [0, 1] by n - 1) or ``both`` (their sum).
    ``forward(emb [B, D], labels [B], tasks [B] indexes into the task order) -> (loss, correct [B])``.

    >>> import torch
    >>> head = CountingLoss(4, {"tones": 5, "higher": 2})
    >>> loss, correct = head(torch.randn(3, 4), torch.tensor([2, 0, 1]), torch.tensor([0, 1, 1]))
    >>> loss.shape, correct.dtype
    (torch.Size([]), torch.bool)
    """

    def __init__(self, dim: int, tasks: Mapping[str, int], mode: str = "classify"):
        super().__init__()
        if not tasks:
            raise ValueError("a counting attribute needs at least one task (tasks={name: num_classes})")
        bad = {k: v for k, v in tasks.items() if int(v) < 2}
        if bad:
            raise ValueError(f"counting tasks need at least 2 classes each, got {bad}")
        if mode not in COUNTING_LOSSES:
            raise ValueError(f"counting loss must be one of {COUNTING_LOSSES}, got {mode!r}")
        self.task_names = list(tasks)
        self.num_classes = [int(tasks[t]) for t in self.task_names]
        self.mode = mode
        self.classifiers = nn.ModuleList(nn.Linear(dim, n) for n in self.num_classes) \
            if mode != "regress" else None
        self.regressors = nn.ModuleList(nn.Linear(dim, 1) for _ in self.num_classes) \
            if mode != "classify" else None

    def predict(self, emb: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """The predicted label [B] of every row for its task (argmax, or the rounded regression)."""
        pred = torch.zeros(len(emb), dtype=torch.long, device=emb.device)
        for t, n in enumerate(self.num_classes):
            rows = tasks == t
            if not bool(rows.any()):
                continue
            if self.classifiers is not None:
                pred[rows] = self.classifiers[t](emb[rows]).argmax(-1)
            else:
                pred[rows] = (self.regressors[t](emb[rows]).squeeze(-1) * (n - 1)).round().clamp(0, n - 1).long()
        return pred

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(((tasks < 0) | (tasks >= len(self.num_classes))).any()):
            raise ValueError(f"counting task index out of range 0..{len(self.num_classes) - 1}: {tasks.tolist()}")
        total = emb.new_zeros(())
        for t, n in enumerate(self.num_classes):
            rows = tasks == t
            if not bool(rows.any()):
                continue
            y, e = labels[rows], emb[rows].float()
            if bool(((y < 0) | (y >= n)).any()):
                raise ValueError(f"counting task {self.task_names[t]!r}: labels must be in 0..{n - 1}, "
                                 f"got {y.tolist()}")
            if self.classifiers is not None:
                total = total + F.cross_entropy(self.classifiers[t](e), y, reduction="sum")
            if self.regressors is not None:
                r = self.regressors[t](e).squeeze(-1)
                total = total + F.smooth_l1_loss(r, y.float() / (n - 1), beta=0.1, reduction="sum")
        with torch.no_grad():
            correct = self.predict(emb, tasks) == labels
        return total / max(len(emb), 1), correct


# ----------------------------------------------------------------------------- weight-free targets


def _text_features(text: str) -> list[tuple[str, float]]:
    norm = unicodedata.normalize("NFKC", text).casefold()
    words = re.findall(r"\w+", norm)
    feats = [(f"w:{w}", 1.0) for w in words]
    feats += [(f"b:{a} {b}", 1.0) for a, b in zip(words, words[1:])]
    feats += [(f"c:{w[i:i + 3]}", 0.5) for w in (f" {w} " for w in words) for i in range(len(w) - 2)]
    return feats


def pivot_text_embedding(texts: Sequence[str], dim: int = 256) -> torch.Tensor:
    """Weight-free sentence targets [N, dim] (unit norm) for the semantic head when no text encoder
    is at hand: signed feature hashing of a text's words, word pairs and character trigrams
    (NFKC, case-folded; CRC-32, so the same text gives the same vector in every process and
    version). Embed each utterance's *pivot-language translation*: translations of one sentence then
    share one target exactly, and sentences sharing words get similar ones.
    Raises ValueError naming the first text with no word in it.

    >>> e = pivot_text_embedding(["The cat sat.", "the CAT sat", "A dog ran far away"], dim=64)
    >>> e.shape, bool(torch.equal(e[0], e[1])), float(e[0] @ e[2]) < 0.5
    (torch.Size([3, 64]), True, True)
    """
    if dim < 8:
        raise ValueError(f"dim must be >= 8, got {dim}")
    out = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        feats = _text_features(text or "")
        if not feats:
            raise ValueError(f"text {i} ({text!r}) has no word to embed")
        for key, weight in feats:
            h = zlib.crc32(key.encode("utf-8"))
            out[i, h % dim] += weight if (h >> 31) & 1 else -weight
        out[i] = F.normalize(out[i], dim=0)
    return out


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` [B, T] is set of ``hidden`` [B, T, D] (a sentence
    encoder's mean pooling over its attention mask); rows without any position give zeros.

    >>> masked_mean(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute: its name (the key of its embedding and labels), kind and settings.

    - ``kind``: ``speaker`` (AAM softmax over ``num_classes`` speakers, ``margin``, ``scale``),
      ``semantic`` (``dim`` = the target sentence embedding's size; ``align``, ``contrastive_weight``,
      ``temperature``) or ``counting`` (``tasks``: task name -> number of classes; ``counting_loss``);
    - ``dim``: the embedding size; ``weight``: the attribute's weight in the total loss;
    - ``pool_hidden``: the attention's hidden size; ``time_context``: give the attention each frame's
      relative position (:class:`AttentiveStatsPooling`; for order questions such as ``higher``).

    >>> AttributeSpec("spk", "speaker", dim=192, num_classes=100).kind
    'speaker'
    >>> AttributeSpec("spk", "speaker", dim=192)
    Traceback (most recent call last):
    ...
    ValueError: attribute 'spk' (speaker): num_classes must be >= 2 (the number of training speakers), got 0
    """

    name: str
    kind: str
    dim: int = 192
    weight: float = 1.0
    num_classes: int = 0
    margin: float = 0.2
    scale: float = 30.0
    align: str = "cosine"
    contrastive_weight: float = 1.0
    temperature: float = 0.05
    tasks: Mapping[str, int] = field(default_factory=dict)
    counting_loss: str = "classify"
    pool_hidden: int = 128
    time_context: bool = False

    def __post_init__(self) -> None:
        where = f"attribute {self.name!r} ({self.kind})"
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"attribute name must be a non-empty string, got {self.name!r}")
        if self.kind not in ATTRIBUTE_KINDS:
            raise ValueError(f"attribute {self.name!r}: kind must be one of {ATTRIBUTE_KINDS}, got {self.kind!r}")
        if self.dim < 1 or self.pool_hidden < 1:
            raise ValueError(f"{where}: dim and pool_hidden must be >= 1, got {self.dim}, {self.pool_hidden}")
        if not self.weight >= 0:
            raise ValueError(f"{where}: weight must be >= 0, got {self.weight}")
        if self.kind == "speaker" and self.num_classes < 2:
            raise ValueError(f"{where}: num_classes must be >= 2 (the number of training speakers), "
                             f"got {self.num_classes}")
        if self.kind == "counting" and not self.tasks:
            raise ValueError(f"{where}: tasks must name at least one counting task, e.g. {{'tones': 8}}")
        object.__setattr__(self, "tasks", {str(k): int(v) for k, v in dict(self.tasks).items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (an export's config stores them)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttributeSpec":
        """The inverse of :meth:`to_dict`; unknown keys are an error naming them.

        >>> spec = AttributeSpec("count", "counting", dim=8, tasks={"tones": 6})
        >>> AttributeSpec.from_dict(spec.to_dict()) == spec
        True
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"attribute {d.get('name')!r}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


@dataclass
class PostTrainBatch:
    """A batch for :meth:`PostTrainModel.loss`.

    ``wavs`` [B, S] 16 kHz, ``lengths`` [B] samples. ``labels`` per attribute name: speaker and
    counting [B] int64 (rows without a label: -1), semantic [B, D] float targets. ``masks`` per
    attribute [B] bool: the rows that carry that attribute's label (default: label >= 0 for integer
    labels, finite rows for targets). ``tasks`` per counting attribute [B] int64: each row's task
    index in the attribute's ``tasks`` order. ``groups`` per semantic attribute [B] int64: sentence
    ids, so translations of one sentence are not each other's negatives.
    """

    wavs: torch.Tensor
    lengths: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    tasks: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, torch.Tensor] = field(default_factory=dict)

    def mask(self, name: str) -> torch.Tensor:
        """The rows [B] that carry attribute ``name``'s label (all False when it has none)."""
        if name in self.masks:
            return self.masks[name].bool()
        y = self.labels.get(name)
        if y is None:
            return torch.zeros(len(self.lengths), dtype=torch.bool)
        if y.is_floating_point():
            return torch.isfinite(y).all(dim=-1) if y.dim() > 1 else torch.isfinite(y)
        return y >= 0


@dataclass
class PostTrainFeatures(StudentFeatures):
    """:class:`StudentFeatures` plus ``inputs`` [B, T, num_mel_bins]: the frontend's log-mel frames at
    the encoder's frame rate (only with ``input_layer``; None otherwise)."""

    inputs: Optional[torch.Tensor] = None


def _frames_at_rate(feats: torch.Tensor, T: int, factor: int, lengths: torch.Tensor) -> torch.Tensor:
    """Fbank frames [B, T_in, F] averaged over windows of ``factor`` frames -> [B, T, F], zero past
    ``lengths`` (the zero padding the frontend leaves is the same alone or in a batch)."""
    need = T * factor
    feats = F.pad(feats, (0, 0, 0, need - feats.shape[1])) if feats.shape[1] < need else feats[:, :need]
    out = feats.reshape(feats.shape[0], T, factor, feats.shape[2]).mean(2)
    return out * length_mask(lengths, T).unsqueeze(-1).to(out.dtype)


@dataclass
class PostTrainOutput:
    """``embeddings``: attribute -> [B, dim]; ``features``: the encoder's frame features."""

    embeddings: dict[str, torch.Tensor]
    features: PostTrainFeatures


@dataclass
class PostTrainLoss:
    """``loss``: the weighted sum of the attributes' losses (ready for backward); ``per_attribute``:
    each attribute's mean loss over its rows (detached; nan when the batch had none); ``rows``: how
    many rows each had; ``correct``: correct predictions among them (speaker: the nearest class
    centre without margin; counting: the task's prediction)."""

    loss: torch.Tensor
    per_attribute: dict[str, float]
    rows: dict[str, int]
    correct: dict[str, int]

    def metrics(self) -> dict[str, float]:
        """Flat floats for logging: loss, ``<attr>/loss``, ``<attr>/rows``, ``<attr>/acc`` where defined."""
        out = {"loss": float(self.loss.detach())}
        for name, v in self.per_attribute.items():
            out[f"{name}/loss"] = v
            out[f"{name}/rows"] = float(self.rows[name])
            if name in self.correct:
                out[f"{name}/acc"] = self.correct[name] / self.rows[name] if self.rows[name] else float("nan")
        return out


def _layer_blocks(encoder: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[tuple[nn.Module, int, int]]]:
    """(input modules before the first layer, the layer modules in output order, per-stack extras).

    Per-stack extras are (module, first layer index, last layer index) for Zipformer2 stack parts that
    sit between layers: the stack's downsampling weights (before its first layer) and its output
    bypass (after its last layer).
    """
    if hasattr(encoder, "stacks"):  # Zipformer2
        layers, extras, i = [], [], 0
        for stack in encoder.stacks:
            n = len(stack.layers)
            layers.extend(stack.layers)
            if n:
                if getattr(stack, "downsample_bias", None) is not None:
                    extras.append((stack, i, -1))  # the bias: before the stack's first layer
                if getattr(stack, "out_combiner", None) is not None:
                    extras.append((stack.out_combiner, -1, i + n - 1))  # after its last layer
            i += n
        return [encoder.encoder_embed], layers, extras
    if hasattr(encoder, "blocks"):  # Conformer
        return [encoder.subsample], list(encoder.blocks), []
    raise TypeError(f"top-N freezing does not know the layers of {type(encoder).__name__}")


class PostTrainModel(nn.Module):
    """A student encoder with one :class:`AttributeHead` (and loss) per attribute.

    ``student``: a :class:`~spear.models.student.StudentModel` (fbank frontend + encoder; any
    freezing mode), or any module with ``features(wavs, lengths) -> StudentFeatures`` and
    ``layer_dims`` (``freeze="frozen"`` only: its features come without gradients).
    ``freeze``: ``frozen`` (the encoder runs in eval mode without gradients), ``top`` (the top
    ``trainable_layers`` layers and what follows them train; everything below stays in eval mode
    and gets no gradients) or ``full``. The mode is applied by setting ``requires_grad`` on the
    student's own parameters (the module passed in is shared, not copied).

    ``input_layer``: the heads also weigh the frontend's log-mel frames, averaged to the encoder's
    frame rate, as layer 0 (as SUPERB's weighted sum includes the input embedding); a small student
    that kept little of the spectral envelope (speaker, pitch) can still use it.

    ``forward(wavs [B, S], lengths [B]) -> PostTrainOutput``; :meth:`loss` for training;
    :meth:`param_groups` for the optimiser. See the module docstring for an example.
    """

    def __init__(self, student: nn.Module, attributes: Sequence[AttributeSpec], freeze: str = "frozen",
                 trainable_layers: int = 0, input_layer: bool = False):
        super().__init__()
        if not attributes:
            raise ValueError("PostTrainModel needs at least one attribute")
        names = [a.name for a in attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"attribute names must be unique, got {names}")
        if freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {freeze!r}")
        self.student = student
        self.attributes = {a.name: a for a in attributes}
        self._differentiable = hasattr(student, "fbank") and hasattr(student, "encoder")
        self.input_layer = bool(input_layer)
        if self.input_layer and not self._differentiable:
            raise ValueError(f"input_layer needs a StudentModel-like encoder (.fbank and .encoder); "
                             f"{type(student).__name__} has no frontend to take it from")
        # the heads' layers: the frontend's frames first (with input_layer), then every encoder layer
        self.layer_dims = ([int(student.encoder.num_mel_bins)] if self.input_layer else []) + \
            [int(d) for d in student.layer_dims]
        self.heads = nn.ModuleDict({a.name: AttributeHead(self.layer_dims, a.dim, a.pool_hidden, a.time_context)
                                    for a in attributes})
        losses: dict[str, nn.Module] = {}
        for a in attributes:
            if a.kind == "speaker":
                losses[a.name] = AAMSoftmax(a.dim, a.num_classes, a.margin, a.scale)
            elif a.kind == "semantic":
                losses[a.name] = SemanticAlignmentLoss(a.align, a.contrastive_weight, a.temperature)
            else:
                losses[a.name] = CountingLoss(a.dim, a.tasks, a.counting_loss)
        self.losses = nn.ModuleDict(losses)
        self.freeze, self.trainable_layers = freeze, int(trainable_layers)
        if freeze != "frozen" and not self._differentiable:
            raise ValueError(f"freeze={freeze!r} needs a StudentModel-like encoder (.fbank and .encoder); "
                             f"{type(student).__name__} only offers features without gradients: use freeze='frozen'")
        self._frozen_modules = self._apply_freezing()
        self.train(self.training)

    # -------------------------------------------------------------- freezing

    def _apply_freezing(self) -> list[nn.Module]:
        """Sets requires_grad on the encoder's parameters; returns the modules to keep in eval mode."""
        for p in self.student.parameters():
            p.requires_grad_(self.freeze != "frozen")
        if self.freeze == "frozen":
            return [self.student]
        if self.freeze == "full":
            return []
        encoder = self.student.encoder
        inputs, layers, extras = _layer_blocks(encoder)
        if not 1 <= self.trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in 1..{len(layers)} (the encoder's layers) with "
                             f"freeze='top', got {self.trainable_layers}")
        first = len(layers) - self.trainable_layers
        frozen = list(inputs) + layers[:first]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        encoder.mask_embedding.requires_grad_(False)  # replaces fbank frames: below every layer
        for module, first_layer, last_layer in extras:
            if first_layer >= 0:  # a stack's downsampling weights feed its first layer
                module.downsample_bias.requires_grad_(first_layer >= first)
            else:  # a stack's output bypass follows its last layer
                for p in module.parameters():
                    p.requires_grad_(last_layer >= first)
        return frozen

    def train(self, mode: bool = True) -> "PostTrainModel":
        super().train(mode)
        for module in getattr(self, "_frozen_modules", []):
            module.eval()  # frozen parts never drop out: their outputs stay those of the input model
        return self

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's trainable parameters."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """The heads' and the losses' parameters (AAM class centres, counting readouts)."""
        return [p for m in (self.heads, self.losses) for p in m.parameters() if p.requires_grad]

    def param_groups(self, head_lr: float, encoder_lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: ``heads`` at ``head_lr`` and (unless frozen) ``encoder`` at the
        lower ``encoder_lr``; each group has a ``name``. Works with torch optimisers and ScaledAdam."""
        if head_lr <= 0 or encoder_lr < 0:
            raise ValueError(f"need head_lr > 0 and encoder_lr >= 0, got {head_lr}, {encoder_lr}")
        groups = [{"params": self.head_parameters(), "lr": float(head_lr), "name": "heads"}]
        enc = self.encoder_parameters()
        if enc:
            groups.append({"params": enc, "lr": float(encoder_lr), "name": "encoder"})
        return groups

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The post-trained parameters apart from the encoder: heads and losses (``heads.*``, ``losses.*``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_heads_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads :meth:`heads_state_dict` output (strict: a missing or unexpected key is an error)."""
        mine = set(self.heads_state_dict())
        missing, unexpected = sorted(mine - set(state)), sorted(set(state) - mine)
        if missing or unexpected:
            raise ValueError(f"head weights do not fit these attributes: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.load_state_dict(dict(state), strict=False)

    def config(self) -> dict[str, Any]:
        """What rebuilds the heads around the same encoder: attributes, freeze, trainable_layers."""
        return {"attributes": [a.to_dict() for a in self.attributes.values()], "freeze": self.freeze,
                "trainable_layers": self.trainable_layers, "input_layer": self.input_layer}

    # -------------------------------------------------------------- forward

    def features(self, wavs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> "PostTrainFeatures":
        """Every encoder layer's frame features, with gradients where the encoder trains (and, with
        ``input_layer``, the frontend's frames at the encoder's rate in ``inputs``)."""
        if not self._differentiable:
            f = self.student.features(wavs, lengths)
            return PostTrainFeatures(list(f.layers), f.final, f.lengths)
        device = next(self.heads.parameters()).device
        wavs = wavs.to(device)
        lengths = None if lengths is None else torch.as_tensor(lengths).to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze != "frozen"):
            feats, n = self.student.fbank(wavs, lengths)
            encoder = self.student.encoder
            short = encoder.min_input_frames - feats.shape[1]
            if short > 0:  # very short clips: pad so the convolutions run; the lengths keep them empty
                feats = F.pad(feats, (0, 0, 0, short))
            out = encoder(feats, n, return_layers=True)
        inputs = None
        if self.input_layer:
            inputs = _frames_at_rate(feats, out.layers[0].shape[1], encoder.subsampling, out.lengths)
        return PostTrainFeatures(list(out.layers), out.frames, out.lengths, inputs)

    def embed(self, features: StudentFeatures, attributes: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Embeddings [B, dim] of ``attributes`` (default: all) from frame features."""
        names = list(self.heads) if attributes is None else list(attributes)
        unknown = sorted(set(names) - set(self.heads))
        if unknown:
            raise ValueError(f"unknown attribute(s) {unknown}; this model has {list(self.heads)}")
        layers = list(features.layers)
        if self.input_layer:
            inputs = getattr(features, "inputs", None)
            if inputs is None:
                raise ValueError("this model weighs the frontend's frames (input_layer): embed features from "
                                 "PostTrainModel.features, which carry them")
            layers = [inputs] + layers
        return {n: self.heads[n](layers, features.lengths) for n in names}

    def forward(self, wavs: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                attributes: Optional[Sequence[str]] = None) -> PostTrainOutput:
        feats = self.features(wavs, lengths)
        return PostTrainOutput(self.embed(feats, attributes), feats)

    # -------------------------------------------------------------- loss

    def loss(self, batch: PostTrainBatch, margins: Optional[Mapping[str, float]] = None) -> PostTrainLoss:
        """The weighted sum of the attributes' losses, each on the rows that carry its label.

        Only rows with at least one label run through the encoder. An attribute without rows in the
        batch adds an exact zero that still reaches its parameters (so every parameter gets a
        gradient, as distributed data parallel training expects). ``margins`` overrides speaker
        attributes' AAM margins for this step (a warm-up, :func:`margin_warmup`).
        """
        unknown = sorted(set(batch.labels) - set(self.attributes))
        if unknown:
            raise ValueError(f"labels for unknown attribute(s) {unknown}; this model has {list(self.attributes)}")
        device = next(self.heads.parameters()).device
        masks = {n: batch.mask(n).to(device) for n in self.attributes}
        B = len(batch.lengths)
        for n, m in masks.items():
            if m.shape != (B,):
                raise ValueError(f"attribute {n!r}: mask/labels must have {B} rows, got {tuple(m.shape)}")
        rows = torch.stack(list(masks.values())).any(0) if masks else torch.zeros(B, dtype=torch.bool)
        idx = rows.nonzero().squeeze(1)
        names = [n for n in self.attributes if bool(masks[n].any())]
        emb: dict[str, torch.Tensor] = {}
        if len(idx):
            wavs = batch.wavs.to(device)[idx]
            lengths = torch.as_tensor(batch.lengths).to(device)[idx]
            keep = int(lengths.max())  # drop padding no kept row needs
            emb = self.embed(self.features(wavs[:, :keep], lengths), names)
        total = self._zero()
        per_attribute: dict[str, float] = {}
        counts: dict[str, int] = {}
        correct: dict[str, int] = {}
        for name, spec in self.attributes.items():
            m = masks[name][idx]
            counts[name] = int(m.sum())
            if not counts[name]:
                per_attribute[name] = float("nan")
                if spec.kind != "semantic":
                    correct[name] = 0
                continue
            if name not in batch.labels:
                raise ValueError(f"attribute {name!r}: masks[{name!r}] marks rows but the batch has no labels for it")
            e = emb[name][m]
            label = batch.labels[name].to(device)[idx][m]
            if spec.kind == "semantic" and (label.dim() != 2 or label.shape[1] != spec.dim):
                raise ValueError(f"attribute {name!r}: targets must be [B, {spec.dim}] (the head's dim), "
                                 f"got {tuple(batch.labels[name].shape)}")
            if spec.kind == "speaker" and bool((label >= spec.num_classes).any()):
                raise ValueError(f"attribute {name!r}: speaker labels must be < num_classes={spec.num_classes}, "
                                 f"got {sorted(set(label.tolist()))[-3:]}")
            if spec.kind == "speaker":
                aam = self.losses[name]
                margin = None if margins is None else margins.get(name)
                loss = aam(e, label.long(), margin)
                with torch.no_grad():
                    correct[name] = int((aam.cosine(e).argmax(-1) == label).sum())
            elif spec.kind == "semantic":
                groups = batch.groups.get(name)
                groups = None if groups is None else groups.to(device)[idx][m]
                loss = self.losses[name](e, label, groups)
            else:
                tasks = batch.tasks.get(name)
                if tasks is None:
                    if len(spec.tasks) != 1:
                        raise ValueError(f"attribute {name!r}: the batch needs tasks[{name!r}] (task index per row) "
                                         f"for its {len(spec.tasks)} tasks")
                    tasks = torch.zeros(B, dtype=torch.long)
                loss, ok = self.losses[name](e, label.long(), tasks.to(device)[idx][m].long())
                correct[name] = int(ok.sum())
            per_attribute[name] = float(loss.detach())
            total = total + spec.weight * loss
        return PostTrainLoss(total, per_attribute, counts, correct)

    def _zero(self) -> torch.Tensor:
        """0.0 that depends on every head and loss parameter (zero gradients, never missing ones)."""
        params = self.head_parameters()
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=params[0].device))
