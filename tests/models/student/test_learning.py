"""A tiny student learns masked prediction of tokens that are a function of its input.

Synthetic task: an utterance is a sequence of "phones" (segments of 20-60 fbank frames), each
one of 12 prototype spectra plus noise; the spectrum's band energies are 8 discrete levels.
A 50 Hz "teacher" token of codebook c is the quantised mean energy of mel band c over the
teacher frame's two fbank frames: a deterministic function of the clean features. With
SPEAR's masking (65% span starts, 10 frames) the student must infer masked frames' tokens
from the visible part of the same phone, so accuracy on masked frames rises above the
most-frequent-token rate only if the whole chain (masking, mask embedding, encoder,
alignment, heads, loss) works. The Conformer runs at 25 Hz, so its targets are
concatenated teacher-frame pairs (2 x C heads). 150 AdamW steps of 6 x 2 s per model,
~35 s (Zipformer2) + ~15 s (Conformer) of CPU time on one thread.
"""

from __future__ import annotations

import pytest
import torch

from spear.models.student import SpearObjective, align_targets, build_encoder, mask_features, student_codebooks
from spear.config import MaskingConfig

BINS, BANDS, LEVELS, PROTOS = 32, 4, 8, 12
TEACHER_RATE = 50.0


class Task:
    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.levels = torch.randint(0, LEVELS, (PROTOS, BANDS), generator=g)  # prototype -> band levels
        texture = 0.3 * torch.randn(PROTOS, BINS, generator=g)
        texture -= texture.view(PROTOS, BANDS, -1).mean(-1).repeat_interleave(BINS // BANDS, dim=1)  # band means kept
        self.spectra = self.levels.float().repeat_interleave(BINS // BANDS, dim=1) + texture

    def batch(self, B: int = 8, T: int = 240):
        g = self.g
        feats = torch.zeros(B, T, BINS)
        tokens = torch.zeros(B, T // 2, BANDS, dtype=torch.long)
        lengths = torch.randint(T * 3 // 4, T + 1, (B,), generator=g)
        lengths[0] = T
        for b in range(B):
            t = 0
            while t < T:
                n = int(torch.randint(20, 61, (), generator=g))
                p = int(torch.randint(0, PROTOS, (), generator=g))
                feats[b, t:t + n] = self.spectra[p]
                t += n
            clean = feats[b].view(T // 2, 2, BANDS, BINS // BANDS).mean(dim=(1, 3))  # teacher frame x band
            tokens[b] = clean.round().long().clamp(0, LEVELS - 1)
            feats[b] += 0.5 * torch.randn(T, BINS, generator=g)
            feats[b, int(lengths[b]):] = 0
        return feats, lengths, tokens, lengths // 2


def _train(arch: str, overrides: dict, steps: int = 150, seed: int = 0, lr: float = 3e-3, B: int = 6, T: int = 200):
    torch.manual_seed(seed)
    task = Task(seed)
    enc = build_encoder(arch, "tiny", num_mel_bins=BINS, **overrides)
    heads = {"speech": student_codebooks(BANDS, TEACHER_RATE, enc.frame_rate)}
    obj = SpearObjective(enc, heads, {"speech": 1.0}, codebook_size=256)
    opt = torch.optim.AdamW(obj.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    mask_gen = torch.Generator().manual_seed(seed + 1)
    cfg = MaskingConfig()
    losses = []
    obj.train()
    for _ in range(steps):
        feats, lengths, tokens, t_len = task.batch(B, T)
        masked = mask_features(feats, lengths, generator=mask_gen, **cfg.model_dump())
        s_len = enc.output_lengths(lengths)
        targets = {"speech": align_targets(tokens, t_len, TEACHER_RATE, enc.frame_rate, s_len)}
        out = obj(masked.feats, lengths, targets, frame_mask=masked.frame_mask)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    # held-out batches from the same task, masked the same way
    obj.eval()
    acc = None
    counts = torch.zeros(LEVELS)
    with torch.no_grad():
        for _ in range(4):
            feats, lengths, tokens, t_len = task.batch(B, T)
            masked = mask_features(feats, lengths, generator=mask_gen, **cfg.model_dump())
            s_len = enc.output_lengths(lengths)
            targets = {"speech": align_targets(tokens, t_len, TEACHER_RATE, enc.frame_rate, s_len)}
            out = obj(masked.feats, lengths, targets, frame_mask=masked.frame_mask)
            a = out.teachers["speech"].accuracy
            acc = a if acc is None else acc + a
            valid = targets["speech"][targets["speech"] >= 0]
            counts += torch.bincount(valid, minlength=256)[:LEVELS].float()
    baseline = float(counts.max() / counts.sum())
    return losses, acc.summary(), baseline


@pytest.mark.slow
@pytest.mark.parametrize("arch,overrides", [("zipformer2", {}), ("transformer", {"subsampling_factor": 4})],
                         ids=["zipformer2-50Hz", "conformer-25Hz-concat"])
def test_tiny_student_learns_masked_prediction(arch, overrides):
    losses, acc, baseline = _train(arch, overrides)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"\n{arch}: loss {first:.3f} -> {last:.3f}; acc masked {acc['acc_masked']:.3f}, "
          f"unmasked {acc['acc_unmasked']:.3f}; most-frequent-token baseline {baseline:.3f}")
    assert last < 0.25 * first
    assert acc["acc_masked"] > baseline + 0.25
    assert acc["acc_unmasked"] > acc["acc_masked"] - 0.05  # visible frames are no harder than masked ones
