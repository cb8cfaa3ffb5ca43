"""Teacher-to-student frame-rate alignment: concatenation, repetition, padding, tolerance."""

from __future__ import annotations

import pytest
import torch

from spear.models.student.targets import (
    IGNORE_INDEX,
    TargetAlignmentError,
    align_targets,
    converted_lengths,
    ignore_utterances,
    rate_factor,
    student_codebooks,
)

X = IGNORE_INDEX


def _tokens(B, T, C):
    """tokens[b, t, c] = 100 b + 10 t + c: every value says where it came from."""
    b = torch.arange(B).view(B, 1, 1)
    t = torch.arange(T).view(1, T, 1)
    c = torch.arange(C).view(1, 1, C)
    return (100 * b + 10 * t + c).to(torch.uint8 if B * 100 < 256 else torch.int64)


def test_teacher_twice_as_fast_concatenates_frame_pairs():
    tokens = _tokens(2, 5, 2)  # 50 Hz teacher, 2 codebooks; utterance 1 has 3 teacher frames
    out = align_targets(tokens, torch.tensor([5, 3]), 50.0, 25.0, torch.tensor([3, 2]))
    assert out.dtype == torch.int64 and out.shape == (2, 3, 4)
    assert out[0].tolist() == [[0, 1, 10, 11], [20, 21, 30, 31], [40, 41, X, X]]
    assert out[1].tolist() == [[100, 101, 110, 111], [120, 121, X, X], [X, X, X, X]]
    assert student_codebooks(16, 50.0, 25.0) == 32  # SPEAR: 2 x 16 heads per student frame


def test_equal_rates_copy_and_truncate_or_pad():
    tokens = _tokens(2, 6, 2)
    # utterance 0: teacher 6 frames, student 4 -> truncated; utterance 1: teacher 3, student 5 -> padded
    out = align_targets(tokens, torch.tensor([6, 3]), 50.0, 50.0, torch.tensor([4, 5]))
    assert out.shape == (2, 5, 2)
    assert out[0].tolist() == [[0, 1], [10, 11], [20, 21], [30, 31], [X, X]]
    assert out[1].tolist() == [[100, 101], [110, 111], [120, 121], [X, X], [X, X]]


def test_teacher_half_as_fast_repeats_frames():
    tokens = _tokens(2, 3, 2)  # 25 Hz audio teacher, 50 Hz student
    out = align_targets(tokens, torch.tensor([3, 2]), 25.0, 50.0, torch.tensor([7, 4]))
    assert out.shape == (2, 7, 2)
    assert out[0].tolist() == [[0, 1], [0, 1], [10, 11], [10, 11], [20, 21], [20, 21], [X, X]]
    assert out[1].tolist() == [[100, 101], [100, 101], [110, 111], [110, 111], [X, X], [X, X], [X, X]]
    assert student_codebooks(8, 25.0, 50.0) == 8
    assert converted_lengths(torch.tensor([3, 2]), 25.0, 50.0).tolist() == [6, 4]


def test_ignored_tokens_stay_ignored():
    tokens = torch.full((1, 4, 2), X)  # a speech utterance: no audio-teacher targets at all
    out = align_targets(tokens, torch.tensor([4]), 25.0, 50.0, torch.tensor([8]))
    assert torch.all(out == X)


def test_mismatch_beyond_the_tolerance_is_an_error():
    tokens = _tokens(2, 60, 1)
    # 0.15 s at 50 Hz = 7 frames: 60 vs 53 passes, 60 vs 52 fails
    align_targets(tokens, torch.tensor([60, 60]), 50.0, 50.0, torch.tensor([53, 60]))
    with pytest.raises(TargetAlignmentError, match=r"#1: teacher 60 vs student 52"):
        align_targets(tokens, torch.tensor([60, 60]), 50.0, 50.0, torch.tensor([60, 52]))
    # at 25 Hz the same 0.15 s is 3 frames; teacher 60 frames at 50 Hz -> 30 at 25 Hz
    align_targets(tokens, torch.tensor([60, 60]), 50.0, 25.0, torch.tensor([27, 33]))
    with pytest.raises(TargetAlignmentError):
        align_targets(tokens, torch.tensor([60, 60]), 50.0, 25.0, torch.tensor([26, 30]))
    with pytest.raises(TargetAlignmentError):  # a wrong rate shows up as a large mismatch
        align_targets(tokens, torch.tensor([60, 60]), 25.0, 50.0, torch.tensor([60, 60]))
    align_targets(tokens, torch.tensor([60, 60]), 50.0, 50.0, torch.tensor([50, 60]), tolerance_s=0.2)


def test_real_frame_counts_fit_the_default_tolerance():
    # Zipformer2 / conformer frames vs the frame counts the pipeline's teachers give for 1..30 s
    from spear.models.frontend import num_frames
    from spear.models.teachers.base import conv_frames

    for seconds in (1.0, 2.37, 10.0, 30.0):
        S = int(seconds * 16000)
        fb = num_frames(S)
        wavlm = conv_frames(S, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))  # 50 Hz
        dasheng = (1 + S // 160) // 4  # 25 Hz
        for student, rate in (((fb - 7) // 2, 50.0), ((fb - 1) // 2 - 2, 50.0), (((fb - 1) // 2 - 1) // 2, 25.0)):
            for t_len, t_rate in ((wavlm, 50.0), (dasheng, 25.0)):
                tok = torch.zeros(1, t_len, 2, dtype=torch.long)
                out = align_targets(tok, torch.tensor([t_len]), t_rate, rate, torch.tensor([student]))
                assert out.shape[1] == student


def test_rates_must_be_integer_multiples():
    assert rate_factor(50, 25) == 2 and rate_factor(25, 50) == -2 and rate_factor(100, 25) == 4
    with pytest.raises(ValueError, match="integer ratio"):
        rate_factor(50, 40)


def test_ignore_utterances():
    t = torch.ones(3, 2, 2, dtype=torch.long)
    out = ignore_utterances(t, torch.tensor([True, False, True]))
    assert torch.all(out[1] == X) and torch.all(out[[0, 2]] == 1)
