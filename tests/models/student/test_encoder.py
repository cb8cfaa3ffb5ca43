"""Student encoders: presets and parameter counts, exact output lengths, padding invariance,
the mask embedding, layer outputs and the Zipformer2 building blocks."""

from __future__ import annotations

import functools

import pytest
import torch

from spear.models.student import PRESETS, SIZES, build_encoder, config_from_dict, config_to_dict, encoder_config
from spear.models.student.zipformer import (
    Zipformer2,
    compact_rel_pos_emb,
    downsample,
    rel_to_abs,
    swoosh_l,
    swoosh_r,
)
from spear.config import StudentConfig

VARIANTS = [  # (architecture, overrides, expected frame rate)
    ("zipformer2", {}, 50.0),
    ("transformer", {}, 50.0),
    ("transformer", {"subsampling_factor": 4}, 25.0),
    ("transformer", {"conv_kernel": 0}, 50.0),
]
IDS = ["zipformer2", "conformer-2x", "conformer-4x", "transformer-2x"]


def _enc(arch, overrides, bins=40, seed=0):
    torch.manual_seed(seed)
    return build_encoder(arch, "tiny", num_mel_bins=bins, **overrides).eval()


@functools.lru_cache(maxsize=None)
def _meta_params(arch, size):
    with torch.device("meta"):
        return build_encoder(arch, size, num_mel_bins=128).num_parameters()


def test_spear_presets_have_the_published_sizes():
    # SPEAR-Large (~327M) and the unified 600M model; built on the meta device, nothing allocated.
    large = _meta_params("zipformer2", "spear-large")
    big = _meta_params("zipformer2", "spear-600m")
    assert abs(large - 327e6) / 327e6 < 0.01, large
    assert abs(big - 600e6) / 600e6 < 0.015, big
    cfg = encoder_config("zipformer2", "spear-large")
    assert cfg.downsampling_factor == (1, 2, 4, 8, 4, 2, 1)
    assert cfg.num_layers == (1, 2, 2, 3, 1, 1, 1)
    assert set(cfg.encoder_dim) == {1024} and set(cfg.feedforward_dim) == {3072} and set(cfg.num_heads) == {8}
    cfg6 = encoder_config("zipformer2", "spear-600m")
    assert cfg6.num_layers == (1, 2, 3, 4, 1, 1, 1) and set(cfg6.encoder_dim) == {1280}
    assert set(cfg6.feedforward_dim) == {3840}
    # the Conformer baseline presets have about the same budgets
    assert abs(_meta_params("transformer", "spear-large") - large) / large < 0.03
    assert abs(_meta_params("transformer", "spear-600m") - big) / big < 0.03


def test_presets_grow_with_size():
    for arch in PRESETS:
        counts = [_meta_params(arch, s) for s in SIZES]
        assert counts == sorted(counts) and counts[0] < 1e6, (arch, counts)


def test_factory_accepts_student_config_and_configs_round_trip():
    enc = build_encoder(StudentConfig(architecture="transformer", size="tiny", num_mel_bins=64))
    assert enc.architecture == "transformer" and enc.num_mel_bins == 64
    for arch in PRESETS:
        cfg = encoder_config(arch, "small")
        assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown student size"):
        build_encoder("zipformer2", "huge")
    with pytest.raises(ValueError, match="unknown student architecture"):
        build_encoder("lstm", "tiny")
    with pytest.raises(ValueError, match="unknown zipformer2 config field"):
        encoder_config("zipformer2", "tiny", dim=3)
    with pytest.raises(ValueError, match="one value per stack"):
        encoder_config("zipformer2", "tiny", num_layers=(1, 2))


@pytest.mark.parametrize("arch,overrides,rate", VARIANTS, ids=IDS)
def test_output_lengths_are_exact(arch, overrides, rate):
    enc = _enc(arch, overrides)
    assert enc.frame_rate == rate
    lengths = torch.tensor([7, 8, 9, 10, 11, 57, 100, 101, 230])
    out = enc(torch.randn(len(lengths), 230, 40), lengths)
    predicted = enc.output_lengths(lengths)
    assert torch.equal(out.lengths, predicted)
    assert out.frames.shape == (len(lengths), int(predicted.max()), enc.output_dim)
    # each utterance alone gives exactly output_lengths frames
    for n in (9, 57, 101):
        alone = enc(torch.randn(1, n, 40), torch.tensor([n]))
        assert alone.frames.shape[1] == int(enc.output_lengths(torch.tensor([n])))
    # the formulas themselves: Zipformer2 (T - 7) // 2, conformer 2x (T - 1) // 2 - 2, 4x ((T - 1) // 2 - 1) // 2
    T = torch.arange(7, 400)
    expected = {50.0: ((T - 7) // 2) if arch == "zipformer2" else ((T - 1) // 2 - 2), 25.0: ((T - 1) // 2 - 1) // 2}
    assert torch.equal(enc.output_lengths(T), expected[rate])


@pytest.mark.parametrize("arch,overrides,rate", VARIANTS, ids=IDS)
def test_an_utterance_gives_the_same_output_alone_and_in_a_padded_batch(arch, overrides, rate):
    enc = _enc(arch, overrides)
    lengths = torch.tensor([230, 117, 64])
    x = torch.randn(3, 230, 40)
    x[1, 117:] = 99.0  # garbage padding must not leak
    x[2, 64:] = -50.0
    batch = enc(x, lengths, return_layers=True)
    for b in range(3):
        alone = enc(x[b:b + 1, : lengths[b]], lengths[b:b + 1], return_layers=True)
        n = int(alone.lengths[0])
        torch.testing.assert_close(alone.frames[0], batch.frames[b, :n], atol=2e-5, rtol=1e-4)
        for a, c in zip(alone.layers, batch.layers):
            torch.testing.assert_close(a[0], c[b, :n], atol=2e-5, rtol=1e-4)
        assert not batch.frames[b, n:].any()  # zeros past the utterance


@pytest.mark.parametrize("arch,overrides,rate", VARIANTS, ids=IDS)
def test_mask_embedding_replaces_masked_fbank_frames(arch, overrides, rate):
    enc = _enc(arch, overrides)
    with torch.no_grad():
        enc.mask_embedding.normal_()
    x = torch.randn(2, 120, 40)
    lengths = torch.tensor([120, 90])
    mask = torch.zeros(2, 120, dtype=torch.bool)
    mask[0, 20:40] = True
    mask[1, 50:60] = True
    out = enc(x, lengths, mask=mask).frames
    # same as writing the embedding into the frames by hand ...
    x_emb = torch.where(mask.unsqueeze(-1), enc.mask_embedding.detach(), x)
    torch.testing.assert_close(out, enc(x_emb, lengths).frames)
    # ... so what was under the mask cannot matter
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), 40) * 10
    torch.testing.assert_close(out, enc(x2, lengths, mask=mask).frames)
    assert not torch.allclose(out, enc(x, lengths).frames)
    # and the embedding is learned: it receives a gradient
    enc.train()
    enc(x, lengths, mask=mask).frames.sum().backward()
    assert enc.mask_embedding.grad is not None and enc.mask_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,overrides,rate", VARIANTS, ids=IDS)
def test_output_frame_mask_takes_the_centre_input_frame(arch, overrides, rate):
    enc = _enc(arch, overrides)
    mask = torch.zeros(1, 200, dtype=torch.bool)
    mask[0, 40:60] = True
    out = enc.output_frame_mask(mask)[0]
    T = int(enc.output_lengths(torch.tensor([200])))
    assert out.shape == (T,)
    s = enc.subsampling
    expected = [40 <= s * t + 3 < 60 for t in range(T)]  # receptive field of 7 frames: centre s*t + 3
    assert out.tolist() == expected
    assert sum(expected) == 20 // s


def test_layer_outputs_follow_the_stacks():
    enc = _enc("zipformer2", {})
    cfg = enc.config
    assert enc.layer_dims == [d for d, n in zip(cfg.encoder_dim, cfg.num_layers) for _ in range(n)]
    out = enc(torch.randn(2, 150, 40), torch.tensor([150, 100]), return_layers=True)
    assert [y.shape[-1] for y in out.layers] == enc.layer_dims
    assert all(y.shape[:2] == out.frames.shape[:2] for y in out.layers)
    # the final output keeps each channel from the newest stack that has it (icefall's full-dim output)
    last = out.layers[-1]
    torch.testing.assert_close(out.frames[..., : last.shape[-1]], last)
    assert enc(torch.randn(1, 50, 40), torch.tensor([50])).layers is None


@pytest.mark.parametrize("arch,overrides,rate", VARIANTS, ids=IDS)
def test_training_step_is_finite_with_an_empty_utterance(arch, overrides, rate):
    enc = _enc(arch, overrides).train()
    x = torch.randn(3, 100, 40)
    out = enc(x, torch.tensor([100, 5, 60]))  # 5 frames: no output frame at all
    assert int(out.lengths[1]) == 0
    out.frames.pow(2).sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="fbank features"):
        enc(torch.randn(1, 50, 41))
    with pytest.raises(ValueError, match="at least 7 fbank frames"):
        enc(torch.randn(1, 5, 40))


# ----------------------------------------------------------------------------- Zipformer2 pieces


def test_swoosh_activations():
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    torch.testing.assert_close(swoosh_l(x), torch.logaddexp(torch.zeros_like(x), x - 4) - 0.08 * x - 0.035)
    torch.testing.assert_close(swoosh_r(x), torch.logaddexp(torch.zeros_like(x), x - 1) - 0.08 * x - 0.313261687)
    assert abs(float(swoosh_r(torch.tensor(0.0)))) < 1e-6  # SwooshR passes through the origin


def test_rel_to_abs_indexes_relative_offsets():
    B, H, T = 2, 3, 5
    scores = torch.randn(B, H, T, 2 * T - 1)  # column m = offset m - (T - 1)
    out = rel_to_abs(scores)
    for i in range(T):
        for j in range(T):
            assert torch.equal(out[:, :, i, j], scores[:, :, i, (j - i) + T - 1])
    pe = compact_rel_pos_emb(T, 16)
    assert pe.shape == (2 * T - 1, 16) and torch.all(pe[:, -1] == 1)
    torch.testing.assert_close(pe[T - 1, 0::2], torch.ones(8))  # offset 0: cos 0 = 1


def test_downsample_uses_each_utterances_own_last_frame():
    x = torch.arange(2 * 7 * 1, dtype=torch.float32).view(2, 7, 1)
    logits = torch.zeros(4)  # uniform average of 4 frames
    out = downsample(x, torch.tensor([7, 5]), logits)
    assert out.shape == (2, 2, 1)
    assert out[0, :, 0].tolist() == [1.5, (4 + 5 + 6 + 6) / 4]  # padded by repeating frame 6
    assert out[1, :, 0].tolist() == [8.5, (11 + 11 + 11 + 11) / 4]  # frame 11 is utterance 1's last


def test_zipformer_stacks_mix_different_widths():
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=40)
    assert isinstance(enc, Zipformer2)
    assert len(enc.stacks) == len(enc.config.downsampling_factor) == 5
    assert enc.output_dim == max(enc.config.encoder_dim)


@pytest.mark.parametrize("arch,overrides,rate", VARIANTS[:2], ids=IDS[:2])
def test_bfloat16_autocast_runs_and_stays_close(arch, overrides, rate):
    # GPUs train under bf16 autocast; the CPU autocast exercises the same dtype paths here.
    enc = _enc(arch, overrides)
    x, lengths = torch.randn(2, 150, 40), torch.tensor([150, 100])
    ref = enc(x, lengths).frames
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x, lengths, mask=torch.rand(2, 150) < 0.3, return_layers=True)
        plain = enc(x, lengths).frames
    assert all(torch.isfinite(y).all() for y in out.layers)
    err = (plain.float() - ref).abs().mean() / ref.abs().mean()
    assert err < 0.05, float(err)
