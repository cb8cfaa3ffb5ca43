"""Token mixing: the audio changes only inside the region at the drawn SNR, targets change only
inside the region, at probability g^2 / (1 + g^2), to the mixed-in utterance's tokens."""

from __future__ import annotations

import math

import pytest
import torch

from spear.models.student.mixing import mix_batch
from spear.config import MixingConfig

SR = 16000
RATES = {"speech": 50.0, "audio": 25.0}


def _batch(B=4, seconds=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = int(seconds * SR)
    lengths = torch.tensor([S - 1000 * b for b in range(B)])
    wavs = torch.randn(B, S, generator=g) * torch.linspace(0.05, 0.3, B).unsqueeze(1)
    for b in range(B):
        wavs[b, lengths[b]:] = 0
    targets = {}
    for name, rate in RATES.items():
        C = 4 if name == "speech" else 2
        T = int(S / SR * rate)
        t = torch.empty(B, T, C, dtype=torch.long)
        for b in range(B):  # utterance b's tokens are all 10 b + c: a replaced target shows where it came from
            t[b] = 10 * b + torch.arange(C)
            t[b, int(lengths[b] / SR * rate):] = -100
        targets[name] = t
    return wavs, lengths, targets


def _frame_region(T, rate, start, n):
    centre = (torch.arange(T, dtype=torch.float64) + 0.5) / rate
    return (centre >= start / SR) & (centre < (start + n) / SR)


def test_audio_changes_only_inside_the_region_at_the_drawn_snr():
    wavs, lengths, targets = _batch()
    cfg = MixingConfig(prob=1.0)
    mixed, _, info = mix_batch(wavs, lengths, targets, RATES, ["speech", "audio", "speech", "audio"],
                               torch.Generator().manual_seed(1), **cfg.model_dump())
    assert torch.equal(wavs, _batch()[0])  # the input is not modified
    for b in range(4):
        j, s, n, sj = (int(info.partner[b]), int(info.start[b]), int(info.length[b]), int(info.partner_start[b]))
        assert j != b and j >= 0
        L = int(lengths[b])
        assert cfg.min_region * L - 1 <= n <= cfg.max_region * L + 1 and 0 <= s and s + n <= L
        outside = torch.ones(wavs.shape[1], dtype=torch.bool)
        outside[s:s + n] = False
        assert torch.equal(mixed[b, outside], wavs[b, outside])
        added = (mixed[b, s:s + n].double() - wavs[b, s:s + n].double())
        torch.testing.assert_close(added, float(info.gain[b]) * wavs[j, sj:sj + n].double(), atol=1e-6, rtol=1e-5)
        snr = 10 * math.log10(float(wavs[b, s:s + n].double().pow(2).sum() / added.pow(2).sum()))
        assert snr == pytest.approx(float(info.snr_db[b]), abs=1e-3)
        lo, hi = cfg.speech_snr_db if j in (0, 2) else cfg.noise_snr_db
        assert lo <= snr <= hi
        g = float(info.g[b])
        assert g == pytest.approx(10 ** (-snr / 20)) and float(info.replace_prob[b]) == pytest.approx(g * g / (1 + g * g))


def test_targets_are_replaced_inside_the_region_at_the_stated_probability():
    observed = expected = variance = 0.0
    trials = 0
    for seed in range(60):
        wavs, lengths, targets = _batch(seed=seed)
        domains = ["speech", "speech", "audio", "audio"]
        _, new, info = mix_batch(wavs, lengths, targets, RATES, domains, torch.Generator().manual_seed(1000 + seed),
                                 **MixingConfig(prob=0.7).model_dump())
        for name, old in targets.items():
            T, C = old.shape[1:]
            changed = new[name] != old
            assert torch.equal(changed, info.replaced[name])
            for b in range(4):
                j = int(info.partner[b])
                if j < 0:
                    assert not changed[b].any()
                    continue
                region = _frame_region(T, RATES[name], int(info.start[b]), int(info.length[b]))
                assert torch.equal(region, info.region[name][b])
                assert not changed[b, ~region].any()  # nothing changes outside the region
                # a replaced target is the partner's token of the same codebook
                assert torch.all(new[name][b][changed[b]] == (10 * j + torch.arange(C)).expand(T, C)[changed[b]])
                # cells that can be replaced: both targets exist
                eligible = (old[b, region] != -100)
                kj = torch.floor(((torch.arange(T, dtype=torch.float64)[region] + 0.5) / RATES[name]
                                  - int(info.start[b]) / SR + int(info.partner_start[b]) / SR) * RATES[name]).long()
                eligible &= (old[j, kj] != -100)
                assert not (changed[b, region] & ~eligible).any()
                # p from the SNR itself (the audio test checks that SNR was applied): g = 10^(-SNR/20)
                g2 = 10 ** (-float(info.snr_db[b]) / 10)
                p = g2 / (1 + g2)
                n_cells = int(eligible.sum())
                observed += int(changed[b, region].sum())
                expected += p * n_cells
                variance += p * (1 - p) * n_cells
                trials += 1
    assert trials > 150
    # a binomial sum: within 4 standard deviations of its expectation
    assert abs(observed - expected) < 4 * math.sqrt(variance), (observed, expected, math.sqrt(variance))
    assert expected > 5000  # enough cells for the bound to mean something


def test_speech_utterances_keep_no_audio_targets_and_no_mixing_changes_nothing():
    wavs, lengths, targets = _batch()
    targets["audio"][[0, 1]] = -100  # speech utterances carry no audio-teacher targets
    domains = ["speech", "speech", "audio", "audio"]
    _, new, _ = mix_batch(wavs, lengths, targets, RATES, domains, torch.Generator().manual_seed(3),
                          **MixingConfig(prob=1.0).model_dump())
    assert torch.all(new["audio"][[0, 1]] == -100)
    mixed, same, info = mix_batch(wavs, lengths, targets, RATES, domains, torch.Generator().manual_seed(3),
                                  **MixingConfig(prob=0.0).model_dump())
    assert torch.equal(mixed, wavs) and all(torch.equal(same[k], targets[k]) for k in targets)
    assert torch.all(info.partner == -1)


def test_mixing_is_reproducible_with_a_generator():
    wavs, lengths, targets = _batch()
    domains = ["speech", "audio", "speech", "audio"]
    a = mix_batch(wavs, lengths, targets, RATES, domains, torch.Generator().manual_seed(7), **MixingConfig(prob=0.5).model_dump())
    b = mix_batch(wavs, lengths, targets, RATES, domains, torch.Generator().manual_seed(7), **MixingConfig(prob=0.5).model_dump())
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in targets)
    assert torch.equal(a[2].partner, b[2].partner)
    with pytest.raises(ValueError, match="domains"):
        mix_batch(wavs, lengths, targets, RATES, ["speech", "noise", "speech", "audio"])


def test_target_lengths_mark_zero_padded_tokens_as_missing():
    # shards pad tokens with 0 and give speech utterances 0 audio-teacher frames
    wavs, lengths, targets = _batch()
    t_lens = {}
    for name, t in targets.items():
        t_lens[name] = (t[..., 0] != -100).sum(1)
        targets[name] = t.clamp_min(0)
    t_lens["audio"][[0, 1]] = 0
    targets["audio"][[0, 1]] = 0
    domains = ["speech", "speech", "audio", "audio"]
    for seed in range(10):
        _, new, info = mix_batch(wavs, lengths, targets, RATES, domains, torch.Generator().manual_seed(seed),
                                 **MixingConfig(prob=1.0).model_dump(), target_lengths=t_lens)
        for name, old in targets.items():
            changed = new[name] != old
            frame = torch.arange(old.shape[1])[None, :]
            assert not changed[frame >= t_lens[name][:, None]].any()  # padding is never a target
            # no padding zero is ever copied in: a replaced value is the partner's real token
            for b in range(4):
                j = int(info.partner[b])
                if changed[b].any():
                    assert j >= 0 and int(t_lens[name][j]) > 0
                    assert torch.all(new[name][b][changed[b]] >= 10 * j)
    assert torch.equal(new["audio"][[0, 1]], targets["audio"][[0, 1]])
