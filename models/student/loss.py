"""SPEAR's training objective: prediction heads, multi-codebook cross-entropy, the asymmetric
two-teacher loss and per-codebook accuracies.

For each teacher t with C_t codebooks per student frame (see
:func:`~spear.models.student.targets.student_codebooks`) a linear head maps every student
frame to C_t x 256 logits. Per teacher:

    CE_t = sum over frames f, codebooks c with a target of  CE(logits[f, c], target[f, c]) / C_t

i.e. cross-entropy averaged over codebooks and summed over frames, on masked and unmasked
frames alike (targets equal to -100 are skipped: padding, alignment edges, speech utterances
for the audio teacher). The asymmetric loss and its normalisation:

    loss = (CE_speech + lambda * CE_audio) / N

where N is the number of valid student frames of the batch (sum of encoder output lengths).
Dividing both terms by the same N keeps SPEAR's summed weighting (the audio term grows with
the share of audio frames in the batch) while making the loss scale independent of batch
size; ``TeacherLoss.ce_sum`` and ``ObjectiveOutput.num_frames`` are returned so a
distributed loop can normalise by a global frame count instead.

Accuracies are counted per codebook on masked and on unmasked student frames separately; a
student frame is masked when the centre fbank frame of its receptive field was masked
(:meth:`StudentEncoder.output_frame_mask`).

Example::

    >>> import torch
    >>> from spear.models.student import build_encoder, SpearObjective
    >>> enc = build_encoder("zipformer2", "tiny", num_mel_bins=40)
    >>> objective = SpearObjective(enc, {"speech": 16, "audio": 8}, {"speech": 1.0, "audio": 0.25})
    >>> feats, lengths = torch.randn(2, 100, 40), torch.tensor([100, 80])
    >>> Ts = int(enc.output_lengths(lengths).max())
    >>> targets = {"speech": torch.randint(0, 256, (2, Ts, 16)), "audio": torch.full((2, Ts, 8), -100)}
    >>> out = objective(feats, lengths, targets)
    >>> out.loss.shape, int(out.num_frames)
    (torch.Size([]), 82)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderOutput, StudentEncoder
from .targets import IGNORE_INDEX


class PredictionHead(nn.Module):
    """Linear map from student frames [B, T, D] to logits [B, T, num_codebooks, codebook_size]."""

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int = 256):
        super().__init__()
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.proj = nn.Linear(dim, num_codebooks * codebook_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        B, T, _ = frames.shape
        return self.proj(frames).view(B, T, self.num_codebooks, self.codebook_size)


def multi_codebook_ce(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over frames of the codebook-averaged cross-entropy: logits [B, T, C, K], targets [B, T, C].

    A (frame, codebook) target equal to ``ignore_index`` adds nothing; the average over
    codebooks divides by C even where some codebooks of a frame are ignored. Float32 maths.

    >>> import torch
    >>> logits = torch.zeros(1, 3, 2, 4)                       # uniform: CE = log 4 per target
    >>> targets = torch.tensor([[[0, 1], [2, -100], [-100, -100]]])
    >>> round(float(multi_codebook_ce(logits, targets)), 4)    # (2 + 1) * log(4) / 2
    2.0794
    """
    if logits.shape[:3] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    C, K = logits.shape[2], logits.shape[3]
    ce = F.cross_entropy(logits.reshape(-1, K).float(), targets.reshape(-1), ignore_index=ignore_index,
                         reduction="sum")
    return ce / C


@dataclass
class AccuracyCounts:
    """Per-codebook counts [C] of correct predictions and targets on masked / unmasked frames.

    Counts add up across batches and workers (``a + b``); :meth:`masked` / :meth:`unmasked`
    give per-codebook accuracies (nan where a codebook had no target).
    """

    correct_masked: torch.Tensor
    total_masked: torch.Tensor
    correct_unmasked: torch.Tensor
    total_unmasked: torch.Tensor

    def __add__(self, other: "AccuracyCounts") -> "AccuracyCounts":
        return AccuracyCounts(self.correct_masked + other.correct_masked, self.total_masked + other.total_masked,
                              self.correct_unmasked + other.correct_unmasked,
                              self.total_unmasked + other.total_unmasked)

    def masked(self) -> torch.Tensor:
        return self.correct_masked / self.total_masked

    def unmasked(self) -> torch.Tensor:
        return self.correct_unmasked / self.total_unmasked

    def summary(self) -> dict[str, float]:
        """Accuracies over all codebooks pooled: {'acc_masked', 'acc_unmasked'} (nan when empty)."""
        def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
            n = float(b.sum())
            return float(a.sum()) / n if n else float("nan")
        return {"acc_masked": ratio(self.correct_masked, self.total_masked),
                "acc_unmasked": ratio(self.correct_unmasked, self.total_unmasked)}


@torch.no_grad()
def codebook_accuracy(logits: torch.Tensor, targets: torch.Tensor, frame_mask: Optional[torch.Tensor] = None,
                      ignore_index: int = IGNORE_INDEX) -> AccuracyCounts:
    """Counts of argmax(logits) == target per codebook, split by the student-frame mask [B, T]
    (None: every frame counts as unmasked)."""
    valid = targets != ignore_index  # [B, T, C]
    correct = (logits.argmax(-1) == targets) & valid
    if frame_mask is None:
        frame_mask = torch.zeros(targets.shape[:2], dtype=torch.bool, device=targets.device)
    m = frame_mask.to(targets.device).unsqueeze(-1)

    def count(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(0, 1)).long().cpu()

    return AccuracyCounts(count(correct & m), count(valid & m), count(correct & ~m), count(valid & ~m))


def asymmetric_loss(ce_sums: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                    num_frames: torch.Tensor | int) -> torch.Tensor:
    """(sum_t weights[t] * ce_sums[t]) / max(num_frames, 1): SPEAR's L_speech + lambda L_audio.

    >>> import torch
    >>> round(float(asymmetric_loss({"speech": torch.tensor(10.0), "audio": torch.tensor(4.0)}, {"speech": 1, "audio": 0.25}, 7)), 4)
    1.5714
    """
    total = sum(float(weights.get(name, 1.0)) * ce for name, ce in ce_sums.items())
    n = num_frames.clamp_min(1) if isinstance(num_frames, torch.Tensor) else max(int(num_frames), 1)
    return total / n


@dataclass
class TeacherLoss:
    """One teacher's share of a batch: ``ce_sum`` (codebook-averaged CE summed over frames,
    with grad), ``num_frames`` (student frames with at least one target) and accuracies."""

    ce_sum: torch.Tensor
    num_frames: torch.Tensor
    accuracy: AccuracyCounts

    @property
    def ce_per_frame(self) -> float:
        n = int(self.num_frames)
        return float(self.ce_sum.detach()) / n if n else float("nan")


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # normalised by num_frames, ready for backward()
    num_frames: torch.Tensor  # valid student frames in the batch (the normaliser)
    teachers: dict[str, TeacherLoss]
    encoder: EncoderOutput

    @property
    def has_targets(self) -> bool:
        """Whether any frame of the batch has a target of any teacher (an audio-only student's
        all-speech batch has none: its loss is a constant 0 with nothing to learn from)."""
        return any(int(t.num_frames) > 0 for t in self.teachers.values())

    def metrics(self) -> dict[str, float]:
        """Flat floats for logging: loss (nan for a batch without targets, not a perfect 0), and per
        teacher ce (per frame with a target) and accuracies."""
        loss = float(self.loss.detach()) if self.has_targets else float("nan")
        out = {"loss": loss, "frames": int(self.num_frames)}
        for name, t in self.teachers.items():
            out[f"{name}/ce"] = t.ce_per_frame
            out.update({f"{name}/{k}": v for k, v in t.accuracy.summary().items()})
        return out


class SpearObjective(nn.Module):
    """Student encoder + one prediction head per teacher + the asymmetric loss.

    ``heads`` maps a teacher name to its codebooks per *student* frame (k * C for a teacher
    k times faster); ``loss_weights`` maps it to its weight (speech 1, audio lambda).
    ``forward(feats, lengths, targets, frame_mask=None)`` takes fbank ``feats`` [B, T, F],
    ``targets`` per teacher [B, T', C_t] as made by :func:`align_targets`, and the fbank
    frame mask (masked frames get the encoder's mask embedding).
    """

    def __init__(self, encoder: StudentEncoder, heads: Mapping[str, int], loss_weights: Optional[Mapping[str, float]] = None,
                 codebook_size: int = 256):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({name: PredictionHead(encoder.output_dim, n, codebook_size)
                                    for name, n in heads.items()})
        self.loss_weights = dict(loss_weights or {})
        unknown = sorted(set(self.loss_weights) - set(heads))
        if unknown:
            raise ValueError(f"loss weights for teachers without a head: {unknown}")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, targets: Mapping[str, torch.Tensor],
                frame_mask: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        missing = sorted(set(self.heads) - set(targets))
        if missing:
            raise ValueError(f"no targets for teacher(s) {missing} (use all -100 for utterances without targets)")
        enc = self.encoder(feats, lengths, mask=frame_mask)
        out_mask = None if frame_mask is None else self.encoder.output_frame_mask(frame_mask)
        num_frames = enc.lengths.sum()
        teachers: dict[str, TeacherLoss] = {}
        for name, head in self.heads.items():
            tgt = targets[name].to(enc.frames.device)
            if tgt.shape[:2] != enc.frames.shape[:2] or tgt.shape[2] != head.num_codebooks:
                raise ValueError(f"{name}: targets {tuple(tgt.shape)}, expected "
                                 f"[{enc.frames.shape[0]}, {enc.frames.shape[1]}, {head.num_codebooks}] "
                                 f"(align them with align_targets)")
            logits = head(enc.frames)
            teachers[name] = TeacherLoss(multi_codebook_ce(logits, tgt), (tgt != IGNORE_INDEX).any(-1).sum(),
                                         codebook_accuracy(logits, tgt, out_mask))
        loss = asymmetric_loss({n: t.ce_sum for n, t in teachers.items()}, self.loss_weights, num_frames)
        return ObjectiveOutput(loss, num_frames, teachers, enc)
