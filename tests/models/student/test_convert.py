"""The key map between this project's Zipformer2 and the SPEAR authors' icefall layout.

Every preset (the table in models/student/encoder.py, whatever it holds when the tests run) must map
every tensor both ways with icefall's shapes; a round trip ours -> theirs -> ours must give the same
outputs on real speech. The expected icefall layout is written out here from icefall's module
structure (k2-fsa/icefall egs/librispeech/ASR/zipformer/{zipformer,subsampling}.py: Conv2dSubsampling
with an nn.Sequential conv stack, Zipformer2 with DownsampledZipformer2Encoder wrappers, the
unused per-layer bypass_scale, downsample_output), independently of the converter's rules.
"""

from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch

from spear.models.frontend import KaldiFbank
from spear.models.student import build_encoder
from spear.models.student.configs import ZipformerConfig
from spear.models.student.convert import (DEFAULT_HEAD_DIMS, HF_PREFIX, find_prefix, from_icefall, icefall_key,
                                          infer_config, our_key, to_icefall, to_icefall_conversion)
from spear.models.student.encoder import PRESETS, encoder_config

TINY_HEADS = dict(query_head_dim=8, value_head_dim=8, pos_head_dim=2)


def icefall_layout(c: ZipformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of icefall's MultiKDModel encoder part (Conv2dSubsampling + Zipformer2 + mask_emb)
    for config ``c``, with its shape: what icefall's ``state_dict()`` holds."""
    c1, c2, c3 = c.subsampling_channels
    width = ((c.num_mel_bins - 1) // 2 - 1) // 2
    out: dict[str, tuple[int, ...]] = {"mask_emb": (c.num_mel_bins,)}
    emb = {"conv.0.weight": (c1, 1, 3, 3), "conv.0.bias": (c1,), "conv.4.weight": (c2, c1, 3, 3), "conv.4.bias": (c2,),
           "conv.7.weight": (c3, c2, 3, 3), "conv.7.bias": (c3,),
           "convnext.depthwise_conv.weight": (c3, 1, 7, 7), "convnext.depthwise_conv.bias": (c3,),
           "convnext.pointwise_conv1.weight": (3 * c3, c3, 1, 1), "convnext.pointwise_conv1.bias": (3 * c3,),
           "convnext.pointwise_conv2.weight": (c3, 3 * c3, 1, 1), "convnext.pointwise_conv2.bias": (c3,),
           "out.weight": (c.encoder_dim[0], width * c3), "out.bias": (c.encoder_dim[0],),
           "out_norm.log_scale": (), "out_norm.bias": (c.encoder_dim[0],)}
    out.update({f"encoder_embed.{k}": v for k, v in emb.items()})
    for i, ds in enumerate(c.downsampling_factor):
        d, f, h, k = c.encoder_dim[i], c.feedforward_dim[i], c.num_heads[i], c.cnn_module_kernel[i]
        dq, dv, dp = c.query_head_dim, c.value_head_dim, c.pos_head_dim
        layer = {"bypass_scale": (d,), "bypass.bypass_scale": (d,), "bypass_mid.bypass_scale": (d,),
                 "self_attn_weights.in_proj.weight": ((2 * dq + dp) * h, d),
                 "self_attn_weights.in_proj.bias": ((2 * dq + dp) * h,),
                 "self_attn_weights.linear_pos.weight": (dp * h, c.pos_dim),
                 "nonlin_attention.in_proj.weight": (3 * (3 * d // 4), d), "nonlin_attention.in_proj.bias": (3 * (3 * d // 4),),
                 "nonlin_attention.out_proj.weight": (d, 3 * d // 4), "nonlin_attention.out_proj.bias": (d,),
                 "norm.log_scale": (), "norm.bias": (d,)}
        for a in ("self_attn1", "self_attn2"):
            layer.update({f"{a}.in_proj.weight": (h * dv, d), f"{a}.in_proj.bias": (h * dv,),
                          f"{a}.out_proj.weight": (d, h * dv), f"{a}.out_proj.bias": (d,)})
        for n, hidden in (("feed_forward1", f * 3 // 4), ("feed_forward2", f), ("feed_forward3", f * 5 // 4)):
            layer.update({f"{n}.in_proj.weight": (hidden, d), f"{n}.in_proj.bias": (hidden,),
                          f"{n}.out_proj.weight": (d, hidden), f"{n}.out_proj.bias": (d,)})
        for n in ("conv_module1", "conv_module2"):
            layer.update({f"{n}.in_proj.weight": (2 * d, d), f"{n}.in_proj.bias": (2 * d,),
                          f"{n}.depthwise_conv.weight": (d, 1, k), f"{n}.depthwise_conv.bias": (d,),
                          f"{n}.out_proj.weight": (d, d), f"{n}.out_proj.bias": (d,)})
        stack = f"encoder.encoders.{i}." + ("encoder." if ds > 1 else "")
        for j in range(c.num_layers[i]):
            out.update({f"{stack}layers.{j}.{name}": shape for name, shape in layer.items()})
        if ds > 1:
            out[f"encoder.encoders.{i}.downsample.bias"] = (ds,)
            out[f"encoder.encoders.{i}.out_combiner.bypass_scale"] = (d,)
    out["encoder.downsample_output.bias"] = (c.output_downsampling_factor,)
    return out


def _meta_encoder(size: str, **overrides):
    with torch.device("meta"):  # the largest presets in a blink: shapes only
        return build_encoder("zipformer2", size, num_mel_bins=128, **overrides)


@pytest.mark.parametrize("size", sorted(PRESETS["zipformer2"]))
@pytest.mark.parametrize("ods", [1, 2])
def test_every_preset_maps_every_tensor_both_ways(size, ods):
    enc = _meta_encoder(size, output_downsampling_factor=ods)
    ours = enc.state_dict()
    conv = to_icefall_conversion(ours, enc.config)
    expected = icefall_layout(enc.config)
    assert sorted(conv.state) == sorted(expected), "missing / unexpected icefall keys"
    assert {k: tuple(v.shape) for k, v in conv.state.items()} == expected
    # filled: exactly icefall's unused per-layer bypass_scale, and the identity output downsampling at 50 Hz
    assert len(conv.filled) == sum(enc.config.num_layers) + (ods == 1)
    # read back from the shapes alone: SPEAR head dims assumed, given as hints for the presets that differ
    spear_heads = all(getattr(enc.config, k) == v for k, v in DEFAULT_HEAD_DIMS.items())
    hints = None if spear_heads else {k: getattr(enc.config, k) for k in DEFAULT_HEAD_DIMS}
    assert spear_heads == (size not in ("tiny", "mini"))
    back = from_icefall(conv.state, hints=hints, num_mel_bins=128)
    assert back.config == enc.config
    assert sorted(back.state) == sorted(ours) and back.ignored == []
    assert {k: tuple(v.shape) for k, v in back.state.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    with torch.device("meta"):
        fresh = build_encoder(back.config)
    fresh.load_state_dict(back.state, strict=True, assign=True)  # no missing or unexpected keys


def test_key_map_rules_on_names():
    c = encoder_config("zipformer2", "spear-base")
    assert icefall_key("encoder_embed.conv2.weight", c) == "encoder_embed.conv.4.weight"
    assert icefall_key("stacks.0.layers.0.conv_module1.depthwise_conv.weight", c) == \
        "encoder.encoders.0.layers.0.conv_module1.depthwise_conv.weight"
    assert icefall_key("stacks.3.layers.2.self_attn1.in_proj.weight", c) == \
        "encoder.encoders.3.encoder.layers.2.self_attn1.in_proj.weight"
    assert icefall_key("stacks.3.downsample_bias", c) == "encoder.encoders.3.downsample.bias"
    assert our_key("encoder.encoders.5.encoder.layers.0.feed_forward3.out_proj.bias") == \
        "stacks.5.layers.0.feed_forward3.out_proj.bias"
    assert our_key("mask_emb") == "mask_embedding"
    with pytest.raises(ValueError, match="no icefall name"):
        icefall_key("mystery.weight", c)
    with pytest.raises(ValueError, match="unknown tensor"):
        our_key("encoder.something_new")


def test_query_rows_are_rescaled_and_nothing_else():
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    ours = enc.state_dict()
    theirs = to_icefall(ours, enc.config)
    rows = enc.config.num_heads[0] * enc.config.query_head_dim
    w_ours = ours["stacks.0.layers.0.self_attn_weights.in_proj.weight"]
    w_theirs = theirs["encoder.encoders.0.layers.0.self_attn_weights.in_proj.weight"]
    torch.testing.assert_close(w_theirs[:rows], w_ours[:rows] * enc.config.query_head_dim ** -0.5)
    assert torch.equal(w_theirs[rows:], w_ours[rows:])  # keys and positional queries untouched
    b_ours = ours["stacks.0.layers.0.self_attn_weights.in_proj.bias"]
    b_theirs = theirs["encoder.encoders.0.layers.0.self_attn_weights.in_proj.bias"]
    torch.testing.assert_close(b_theirs[:rows], b_ours[:rows] * enc.config.query_head_dim ** -0.5)
    for k, v in ours.items():
        if "self_attn_weights.in_proj" not in k:
            assert torch.equal(theirs[icefall_key(k, enc.config)], v), k


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    """Real speech: espeak-ng's rendering of a sentence, at 16 kHz."""
    from spear.synthetic.speech import synth_speech

    x = synth_speech("the quick brown fox jumps over the lazy dog", "en-us", 160, 50)
    return torch.tensor(soxr.resample(x, 22050, 16000), dtype=torch.float32)


def _perturbed(enc):
    """Move every weight off its initial value (bypass scales inside icefall's [0.2, 1])."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in enc.named_parameters():
            if k.endswith("bypass_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.25)
            elif k.endswith("log_scale") or "downsample" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-2) * 0.3)
    return enc.eval()


@pytest.mark.parametrize("ods", [1, 2])
def test_round_trip_gives_the_same_outputs_on_real_speech(speech, ods):
    torch.manual_seed(0)
    enc = _perturbed(build_encoder("zipformer2", "tiny", num_mel_bins=80, output_downsampling_factor=ods))
    feats, lens = KaldiFbank(num_mel_bins=80)(speech[None], torch.tensor([len(speech)]))
    theirs = to_icefall(enc.state_dict(), enc.config, prefix=HF_PREFIX)
    back = from_icefall(theirs, hints=TINY_HEADS, num_mel_bins=80)
    again = build_encoder(back.config).eval()
    again.load_state_dict(back.state, strict=True)
    with torch.no_grad():
        a = enc(feats, lens, return_layers=True)
        b = again(feats, lens, return_layers=True)
    assert a.frames.shape[1] > 50  # a few seconds of speech
    # The query rows go through x / sqrt(d_q) * sqrt(d_q) in float32 storage (sqrt(8) is not a power of
    # two, so some values come back one ulp away); everything else is bit-identical.
    for k, v in enc.state_dict().items():
        if "self_attn_weights.in_proj" in k:
            torch.testing.assert_close(back.state[k], v, rtol=2.0 ** -23, atol=0.0)
        else:
            assert torch.equal(back.state[k], v), k
    assert (a.frames - b.frames).abs().max().item() < 1e-5
    for x, y in zip(a.layers, b.layers):
        assert (x - y).abs().max().item() < 1e-5


def test_round_trip_through_float64_tensors_is_bit_exact(speech):
    """The only loss in the float32 round trip is the float32 storage of the rescaled query rows:
    through float64 tensors (what a float64 icefall file holds) every weight and output comes back exact."""
    enc = _perturbed(build_encoder("zipformer2", "tiny", num_mel_bins=80))
    state64 = {k: v.double() for k, v in enc.state_dict().items()}
    back = from_icefall(to_icefall(state64, enc.config), hints=TINY_HEADS, num_mel_bins=80)
    again = build_encoder(back.config).eval()
    again.load_state_dict(back.state)  # copied into float32 parameters
    for k, v in enc.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    feats, lens = KaldiFbank(num_mel_bins=80)(speech[None], torch.tensor([len(speech)]))
    with torch.no_grad():
        assert torch.equal(enc(feats, lens).frames, again(feats, lens).frames)


def test_training_heads_are_ignored_and_unknown_tensors_refused():
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    theirs = to_icefall(enc.state_dict(), enc.config)
    theirs["codebook_loss_heads.0.codebook_loss_net.linear.weight"] = torch.zeros(2, 2)
    theirs["audio_tagging_proj.1.weight"] = torch.zeros(527, 64)
    conv = from_icefall(theirs, hints=TINY_HEADS, num_mel_bins=80)
    assert conv.ignored == ["audio_tagging_proj.1.weight", "codebook_loss_heads.0.codebook_loss_net.linear.weight"]
    theirs["encoder.encoders.0.layers.0.new_module.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="new_module"):
        from_icefall(theirs, hints=TINY_HEADS, num_mel_bins=80)


def test_encoder_only_file_gets_a_mask_embedding_and_notes_on_clamped_values():
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    theirs = to_icefall(enc.state_dict(), enc.config)
    del theirs["mask_emb"]
    theirs["encoder.encoders.0.layers.0.bypass.bypass_scale"] = torch.full((32,), 1.3)
    conv = from_icefall(theirs, hints=TINY_HEADS, num_mel_bins=80)
    assert conv.filled == ["mask_embedding"] and conv.state["mask_embedding"].shape == (80,)
    assert len(conv.notes) == 1 and "clamped to [0.2, 1]" in conv.notes[0]


def test_inference_errors_name_what_is_wrong():
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    theirs = to_icefall(enc.state_dict(), enc.config)
    with pytest.raises(ValueError, match="head dims"):
        infer_config(theirs, num_mel_bins=80)  # tiny's head dims are not SPEAR's: hints needed
    with pytest.raises(ValueError, match="mel bins"):
        infer_config(theirs, TINY_HEADS, num_mel_bins=128)
    with pytest.raises(ValueError, match="no encoder_embed"):
        find_prefix({"foo": torch.zeros(1)})
    assert find_prefix({HF_PREFIX + "encoder_embed.conv.0.weight": 0}) == HF_PREFIX
    assert np.isclose(infer_config(theirs, TINY_HEADS, num_mel_bins=80).pos_dim, enc.config.pos_dim)
