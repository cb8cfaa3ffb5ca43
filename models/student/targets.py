"""Teacher tokens -> per-student-frame targets: frame-rate alignment, padding, ignore index.

A teacher's MVQ tokens come at the teacher's frame rate ([T_teacher, C] per utterance, C
codebooks); the student predicts at its own rate. SPEAR's rule:

- teacher k times faster (k integer, e.g. 50 Hz tokens for a 25 Hz student): concatenate k
  consecutive teacher frames into one target of k * C codebooks ([T_t, C] -> [ceil(T_t / k), k C]);
  the student then has k * C prediction heads per frame;
- teacher k times slower (e.g. a 25 Hz audio teacher for a 50 Hz student): repeat each
  teacher frame k times ([T_t, C] -> [k T_t, C]);
- equal rates: unchanged.

Frames are aligned from the start (frame 0 with frame 0), as icefall / fairseq HuBERT do.
The converted teacher length and the student length differ by a few frames because the
two models cut frames differently at the edges (Zipformer2's subsampling drops 7 fbank
frames, 70 ms; a 25 Hz teacher rounds to 40 ms; WavLM drops 80 samples). That mismatch is
truncated (longer teacher) or padded with ``IGNORE_INDEX`` (shorter teacher) when it is
at most ``tolerance_s`` seconds (default 0.15 s: 7 frames at 50 Hz, 3 at 25 Hz); beyond
it the tokens belong to a different segment or a wrong frame rate, and
:func:`align_targets` raises :class:`TargetAlignmentError` naming the utterances.

Example::

    >>> import torch
    >>> from spear.models.student.targets import align_targets
    >>> tokens = torch.arange(8).view(1, 4, 2)                      # 4 teacher frames, 2 codebooks, 50 Hz
    >>> align_targets(tokens, torch.tensor([4]), 50.0, 25.0, torch.tensor([2])).tolist()
    [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    >>> align_targets(tokens[:, :2], torch.tensor([2]), 25.0, 50.0, torch.tensor([4])).tolist()
    [[[0, 1], [0, 1], [2, 3], [2, 3]]]
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

IGNORE_INDEX = -100


def has_any_target(targets: Mapping[str, torch.Tensor], ignore_index: int = IGNORE_INDEX) -> bool:
    """Whether any teacher has a target anywhere in the batch. An audio-only student's all-speech
    batch has none: its loss is a constant 0 with no gradient worth a step.

    >>> has_any_target({"audio": torch.full((2, 3, 4), -100)}), has_any_target({"audio": torch.tensor([[[-100, 7]]])})
    (False, True)
    """
    return any(bool((t != ignore_index).any()) for t in targets.values())


class TargetAlignmentError(ValueError):
    """Teacher and student frame counts differ by more than the tolerance."""


def rate_factor(teacher_rate: float, student_rate: float) -> int:
    """Signed integer ratio: k > 1 teacher k times faster (concatenate), -k teacher k times slower
    (repeat), 1 equal. Raises ValueError for a non-integer ratio (e.g. 50 vs 40 Hz).

    >>> rate_factor(50, 25), rate_factor(25, 50), rate_factor(50, 50)
    (2, -2, 1)
    """
    if teacher_rate <= 0 or student_rate <= 0:
        raise ValueError(f"frame rates must be positive, got teacher {teacher_rate}, student {student_rate}")
    hi, lo = max(teacher_rate, student_rate), min(teacher_rate, student_rate)
    k = round(hi / lo)
    if abs(hi / lo - k) > 1e-6:
        raise ValueError(f"teacher rate {teacher_rate} Hz and student rate {student_rate} Hz are not in an "
                         f"integer ratio; concatenation / repetition needs one")
    return k if teacher_rate >= student_rate else -k


def student_codebooks(num_codebooks: int, teacher_rate: float, student_rate: float) -> int:
    """Codebooks per student frame (prediction heads): k * C when the teacher is k times faster, else C.

    >>> student_codebooks(16, 50.0, 25.0), student_codebooks(8, 25.0, 50.0)
    (32, 8)
    """
    k = rate_factor(teacher_rate, student_rate)
    return num_codebooks * k if k > 1 else num_codebooks


def converted_lengths(teacher_lengths: torch.Tensor, teacher_rate: float, student_rate: float) -> torch.Tensor:
    """Teacher frame counts at the student rate: ceil(T / k) when concatenating, k T when repeating."""
    k = rate_factor(teacher_rate, student_rate)
    t = torch.as_tensor(teacher_lengths, dtype=torch.long)
    if k > 1:
        return torch.div(t + k - 1, k, rounding_mode="floor")
    return t * (-k) if k < 0 else t.clone()


def align_targets(tokens: torch.Tensor, teacher_lengths: torch.Tensor, teacher_rate: float, student_rate: float,
                  student_lengths: torch.Tensor, tolerance_s: float = 0.15,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Teacher tokens [B, T_t, C] (any integer dtype) -> int64 targets [B, max(student_lengths), C'].

    ``C'`` is :func:`student_codebooks`. Positions past an utterance's teacher tokens or past
    its student frames are ``ignore_index``; tokens already equal to ``ignore_index`` (an
    utterance without targets for this teacher) stay ignored. Raises
    :class:`TargetAlignmentError` when an utterance's converted teacher length and student
    length differ by more than ``tolerance_s`` seconds of student frames.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, T, C], got {tuple(tokens.shape)}")
    B, Tt, C = tokens.shape
    device = tokens.device
    t_len = torch.as_tensor(teacher_lengths, dtype=torch.long).to(device)
    s_len = torch.as_tensor(student_lengths, dtype=torch.long).to(device)
    if t_len.shape != (B,) or s_len.shape != (B,):
        raise ValueError(f"teacher_lengths and student_lengths must be [B] = [{B}]")
    if B and int(t_len.max()) > Tt:
        raise ValueError(f"a teacher length exceeds the token width {Tt}")
    k = rate_factor(teacher_rate, student_rate)

    tok = tokens.long().masked_fill(torch.arange(Tt, device=device)[None, :, None] >= t_len[:, None, None],
                                    ignore_index)
    if k > 1:  # teacher faster: k consecutive frames side by side
        pad = (-Tt) % k
        tok = torch.nn.functional.pad(tok, (0, 0, 0, pad), value=ignore_index)
        tok = tok.reshape(B, (Tt + pad) // k, k * C)
    elif k < 0:  # teacher slower: each frame repeated
        tok = tok.repeat_interleave(-k, dim=1)
    conv_len = converted_lengths(t_len, teacher_rate, student_rate)

    max_diff = math.floor(tolerance_s * student_rate + 1e-9)
    diff = (conv_len - s_len).abs()
    bad = (diff > max_diff).nonzero().flatten().tolist()
    if bad:
        details = ", ".join(f"#{b}: teacher {int(conv_len[b])} vs student {int(s_len[b])}" for b in bad[:5])
        raise TargetAlignmentError(
            f"teacher tokens ({teacher_rate} Hz) and student frames ({student_rate} Hz) differ by more than "
            f"{max_diff} frames ({tolerance_s} s) in {len(bad)} utterance(s) [{details}]: wrong frame rate, "
            f"or tokens of another segment")

    Ts = int(s_len.max()) if B else 0
    out = torch.full((B, Ts, tok.shape[2]), ignore_index, dtype=torch.long, device=device)
    n = min(Ts, tok.shape[1])
    out[:, :n] = tok[:, :n]
    keep = torch.arange(Ts, device=device)[None, :] < torch.minimum(conv_len, s_len)[:, None]
    return out.masked_fill(~keep.unsqueeze(-1), ignore_index)


def ignore_utterances(targets: torch.Tensor, keep: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Set every target of the utterances where ``keep`` [B] is False to ``ignore_index``.

    SPEAR's asymmetric loss: audio-teacher targets exist for audio-domain utterances only.

    >>> import torch
    >>> ignore_utterances(torch.zeros(2, 1, 1, dtype=torch.long), torch.tensor([True, False])).flatten().tolist()
    [0, -100]
    """
    return targets.masked_fill(~keep.to(targets.device).view(-1, *([1] * (targets.dim() - 1))), ignore_index)
