"""Multi-codebook CE, accuracies on masked / unmasked frames, the asymmetric loss, SpearObjective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spear.models.student import (
    SpearObjective,
    align_targets,
    asymmetric_loss,
    build_encoder,
    codebook_accuracy,
    has_any_target,
    ignore_utterances,
    mask_features,
    multi_codebook_ce,
    student_codebooks,
)

X = -100


def test_ce_is_codebook_averaged_and_frame_summed():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 256)
    targets = torch.randint(0, 256, (2, 5, 3))
    targets[0, 4] = X  # a padded frame
    targets[1, 2, 1] = X  # one missing codebook
    got = multi_codebook_ce(logits, targets)
    manual = 0.0
    for b in range(2):
        for t in range(5):
            for c in range(3):
                if targets[b, t, c] != X:
                    manual += float(-F.log_softmax(logits[b, t, c], -1)[targets[b, t, c]])
    assert math.isclose(float(got), manual / 3, rel_tol=1e-5)
    # uniform logits: log(256) per target
    assert math.isclose(float(multi_codebook_ce(torch.zeros(1, 4, 2, 256), torch.zeros(1, 4, 2, dtype=torch.long))),
                        4 * math.log(256), rel_tol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        multi_codebook_ce(logits, targets[:, :4])


def test_accuracy_is_split_by_the_frame_mask():
    logits = torch.zeros(1, 4, 2, 5)
    logits[0, :, :, 1] = 1.0  # predicts token 1 everywhere
    targets = torch.tensor([[[1, 1], [1, 0], [0, 0], [1, X]]])
    frame_mask = torch.tensor([[True, True, False, False]])
    acc = codebook_accuracy(logits, targets, frame_mask)
    assert acc.correct_masked.tolist() == [2, 1] and acc.total_masked.tolist() == [2, 2]
    assert acc.correct_unmasked.tolist() == [1, 0] and acc.total_unmasked.tolist() == [2, 1]
    assert acc.masked().tolist() == [1.0, 0.5]
    assert acc.summary() == {"acc_masked": 0.75, "acc_unmasked": 1 / 3}
    both = acc + acc
    assert both.total_masked.tolist() == [4, 4] and both.summary() == acc.summary()


def test_asymmetric_loss_weights_audio_and_normalises_by_all_frames():
    ce = {"speech": torch.tensor(30.0), "audio": torch.tensor(8.0)}
    assert float(asymmetric_loss(ce, {"speech": 1.0, "audio": 0.25}, 10)) == pytest.approx(3.2)
    assert float(asymmetric_loss(ce, {"speech": 1.0, "audio": 0.0}, 10)) == pytest.approx(3.0)


def _batch(arch="zipformer2", seed=0):
    torch.manual_seed(seed)
    enc = build_encoder(arch, "tiny", num_mel_bins=40)
    feats = torch.randn(3, 200, 40)
    lengths = torch.tensor([200, 160, 120])
    s_len = enc.output_lengths(lengths)
    # speech teacher: 50 Hz, 4 codebooks; audio teacher: 25 Hz, 2 codebooks; utterance 2 is audio
    sp_len = s_len + 2
    speech = torch.randint(0, 256, (3, int(sp_len.max()), 4))
    au_len = (s_len + 1) // 2
    audio = ignore_utterances(torch.randint(0, 256, (3, int(au_len.max()), 2)), torch.tensor([False, False, True]))
    targets = {"speech": align_targets(speech, sp_len, 50.0, enc.frame_rate, s_len),
               "audio": align_targets(audio, au_len, 25.0, enc.frame_rate, s_len)}
    heads = {"speech": student_codebooks(4, 50.0, enc.frame_rate), "audio": student_codebooks(2, 25.0, enc.frame_rate)}
    return enc, feats, lengths, targets, heads


@pytest.mark.parametrize("arch", ["zipformer2", "transformer"])
def test_objective_matches_the_formula_and_trains_every_part(arch):
    enc, feats, lengths, targets, heads = _batch(arch)
    obj = SpearObjective(enc, heads, {"speech": 1.0, "audio": 0.25})
    masked = mask_features(feats, lengths, generator=torch.Generator().manual_seed(0))
    out = obj(masked.feats, lengths, targets, frame_mask=masked.frame_mask)
    n = int(enc.output_lengths(lengths).sum())
    assert int(out.num_frames) == n
    # recompute from the encoder output and the heads by hand
    frames = out.encoder.frames
    ce = {t: multi_codebook_ce(obj.heads[t](frames), targets[t]) for t in heads}
    torch.testing.assert_close(out.loss, (ce["speech"] + 0.25 * ce["audio"]) / n)
    # audio targets only on the audio utterance; speech targets everywhere the student has frames
    assert int(out.teachers["audio"].num_frames) == int(enc.output_lengths(lengths[2:]).sum())
    assert int(out.teachers["speech"].num_frames) == n
    acc = out.teachers["speech"].accuracy
    assert int(acc.total_masked.sum() + acc.total_unmasked.sum()) == int((targets["speech"] != X).sum())
    assert int(acc.total_masked.sum()) > 0 and int(acc.total_unmasked.sum()) > 0
    metrics = out.metrics()
    assert set(metrics) >= {"loss", "speech/ce", "speech/acc_masked", "audio/acc_unmasked"}
    out.loss.backward()
    assert enc.mask_embedding.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.heads.parameters())


def test_a_batch_without_targets_logs_nan_not_a_perfect_zero():
    """An audio-only student's all-speech batch: utterances 0-1 are speech, so ignoring utterance 2
    leaves the audio head nothing to predict."""
    enc, feats, lengths, targets, heads = _batch()
    audio_only = {"audio": targets["audio"]}
    obj = SpearObjective(enc, {"audio": heads["audio"]}, {"audio": 0.25})
    assert has_any_target(audio_only) and obj(feats, lengths, audio_only).has_targets
    all_speech = {"audio": ignore_utterances(targets["audio"], torch.tensor([False, False, False]))}
    assert not has_any_target(all_speech)
    out = obj(feats, lengths, all_speech)
    assert not out.has_targets and float(out.loss.detach()) == 0.0  # the loss itself is a constant 0...
    assert math.isnan(out.metrics()["loss"]) and math.isnan(out.metrics()["audio/ce"])  # ...and logged as nan
    assert math.isfinite(obj(feats, lengths, audio_only).metrics()["loss"])


def test_objective_checks_target_shapes():
    enc, feats, lengths, targets, heads = _batch()
    obj = SpearObjective(enc, heads)
    with pytest.raises(ValueError, match="no targets for teacher"):
        obj(feats, lengths, {"speech": targets["speech"]})
    bad = dict(targets, speech=targets["speech"][:, :-1])
    with pytest.raises(ValueError, match="align them"):
        obj(feats, lengths, bad)
    with pytest.raises(ValueError, match="without a head"):
        SpearObjective(enc, heads, {"music": 1.0})
