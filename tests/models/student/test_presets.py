"""The authors' published Zipformer2 presets (spear-base / spear-large / spear-600m) and the 25 Hz
output: parameter counts on the meta device, output lengths, the frame mask and target alignment."""

from __future__ import annotations

import functools

import pytest
import torch

from spear.config import StudentConfig
from spear.models.student import build_encoder, config_from_dict, config_to_dict, encoder_config
from spear.models.student.encoder import PRESETS, SIZES
from spear.models.student.targets import align_targets, student_codebooks

# (preset, layers per stack, dim, FFN, published parameters): marcoyang1998/icefall
# egs/general_audio_encoder/mtl/run/train_{96m,316m,600m}_uniform_v2_zipformer_*.sh and the
# model cards (Base 93M, Large 327M, 600M).
PUBLISHED = [
    ("spear-base", (1, 2, 3, 3, 1, 1, 1), 512, 1536, 93e6),
    ("spear-large", (1, 2, 2, 3, 1, 1, 1), 1024, 3072, 327e6),
    ("spear-600m", (1, 2, 3, 4, 1, 1, 1), 1280, 3840, 600e6),
]


@functools.lru_cache(maxsize=None)
def _meta_params(size: str, frame_rate: float = 50.0) -> int:
    with torch.device("meta"):
        return build_encoder("zipformer2", size, num_mel_bins=128, frame_rate=frame_rate).num_parameters()


@pytest.mark.parametrize("size,layers,dim,ffn,published", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_presets_match_the_authors_models(size, layers, dim, ffn, published):
    cfg = encoder_config("zipformer2", size)
    assert cfg.num_layers == layers
    assert set(cfg.encoder_dim) == {dim} and set(cfg.feedforward_dim) == {ffn} and set(cfg.num_heads) == {8}
    assert cfg.downsampling_factor == (1, 2, 4, 8, 4, 2, 1)
    assert cfg.cnn_module_kernel == (31, 31, 15, 15, 15, 31, 31)
    assert (cfg.query_head_dim, cfg.value_head_dim, cfg.pos_head_dim, cfg.pos_dim) == (32, 12, 4, 48)
    n = _meta_params(size)
    assert abs(n - published) / published < 0.01, n
    # the 25 Hz output adds only the 2 weights of the output downsampling
    assert _meta_params(size, 25.0) == n + 2


def test_base_keeps_its_old_architecture_beside_spear_base():
    # `base` stays what it was (configs and checkpoints that name it keep working); spear-base has one more layer
    assert encoder_config("zipformer2", "base").num_layers == (1, 2, 2, 3, 1, 1, 1)
    assert abs(_meta_params("base") - 85.7e6) < 0.1e6
    assert SIZES.index("base") < SIZES.index("spear-base") < SIZES.index("spear-large")


def _tiny25(bins=40, seed=0):
    torch.manual_seed(seed)
    return build_encoder("zipformer2", "tiny", num_mel_bins=bins, frame_rate=25).eval()


def test_25hz_output_lengths_are_half_the_50hz_ones_rounded_up():
    enc = _tiny25()
    assert enc.frame_rate == 25.0 and enc.subsampling == 4 and enc.receptive_field == 9
    lengths = torch.tensor([300, 211, 9, 8, 7])
    feats = torch.randn(len(lengths), 300, 40)
    out = enc(feats, lengths, return_layers=True)
    t50 = (lengths - 7) // 2
    expected = (t50 + 1) // 2
    assert out.lengths.tolist() == expected.tolist() == enc.output_lengths(lengths).tolist()
    assert out.frames.shape[1] == int(expected.max())
    # every layer comes at the output rate, zero past each utterance
    assert all(y.shape[:2] == out.frames.shape[:2] for y in out.layers)
    for b, n in enumerate(expected.tolist()):
        assert out.frames[b, n:].abs().sum() == 0 and out.frames[b, :n].abs().sum() > 0 or n == 0


def test_25hz_output_is_the_learned_average_of_two_50hz_frames():
    enc = _tiny25()
    enc50 = build_encoder("zipformer2", "tiny", num_mel_bins=40)
    state = {k: v for k, v in enc.state_dict().items() if not k.startswith("downsample_output.")}
    enc50.load_state_dict(state)  # same weights, no output downsampling: the key sets differ by exactly it
    enc50.eval()
    with torch.no_grad():
        enc.downsample_output.bias.copy_(torch.tensor([0.3, -0.2]))
        feats = torch.randn(1, 207, 40)  # 100 frames at 50 Hz
        y50 = enc50(feats).frames[0]
        y25 = enc(feats).frames[0]
    w = torch.tensor([0.3, -0.2]).softmax(0)
    assert y25.shape[0] == 50
    torch.testing.assert_close(y25, w[0] * y50[0::2] + w[1] * y50[1::2], rtol=1e-5, atol=1e-5)


def test_25hz_output_does_not_depend_on_padding():
    enc = _tiny25(seed=1)
    a = torch.randn(1, 151, 40)  # odd 50 Hz count (72): the last 25 Hz frame repeats frame 71
    padded = torch.randn(2, 200, 40) * 5  # garbage past the first utterance's end, another utterance beside it
    padded[0, :151] = a[0]
    with torch.no_grad():
        alone = enc(a, torch.tensor([151])).frames[0]
        batch = enc(padded, torch.tensor([151, 200])).frames[0]
    n = alone.shape[0]
    torch.testing.assert_close(batch[:n], alone, rtol=1e-4, atol=1e-5)


def test_25hz_frame_mask_takes_the_centre_of_both_50hz_frames():
    enc = _tiny25()
    mask = torch.zeros(1, 107, dtype=torch.bool)
    mask[0, 4 * 3 + 4] = True  # the centre input frame of output frame 3: 4 t + 4
    out = enc.output_frame_mask(mask)[0]
    assert out.shape[0] == int(enc.output_lengths(torch.tensor([107])))
    assert out.nonzero().flatten().tolist() == [3]


def test_25hz_targets_stack_two_wavlm_frames_and_keep_dasheng_one_to_one():
    enc = _tiny25()
    feats_len = torch.tensor([407])  # 4.07 s: 200 frames at 50 Hz, 100 at 25 Hz
    s_len = enc.output_lengths(feats_len)
    assert s_len.tolist() == [100]
    wavlm = torch.randint(0, 256, (1, 201, 16))  # WavLM: 50 Hz, 16 codebooks (one frame more, cut)
    dasheng = torch.randint(0, 256, (1, 101, 8))  # Dasheng: 25 Hz, 8 codebooks
    t_w = align_targets(wavlm, torch.tensor([201]), 50.0, enc.frame_rate, s_len)
    t_d = align_targets(dasheng, torch.tensor([101]), 25.0, enc.frame_rate, s_len)
    assert t_w.shape == (1, 100, student_codebooks(16, 50.0, 25.0)) == (1, 100, 32)
    assert torch.equal(t_w[0, 7], torch.cat([wavlm[0, 14], wavlm[0, 15]]))
    assert t_d.shape == (1, 100, 8) and torch.equal(t_d[0], dasheng[0, :100].long())


def test_student_config_frame_rate_reaches_the_encoder_and_round_trips():
    enc = build_encoder(StudentConfig(size="tiny", frame_rate=25, num_mel_bins=40))
    assert enc.frame_rate == 25.0 and enc.config.output_downsampling_factor == 2
    assert build_encoder(StudentConfig(architecture="transformer", size="tiny", frame_rate=25,
                                       num_mel_bins=40)).frame_rate == 25.0
    cfg = encoder_config("zipformer2", "spear-base", frame_rate=25)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    old = config_to_dict(encoder_config("zipformer2", "small"))
    del old["output_downsampling_factor"]  # an export written before the option: 50 Hz
    assert config_from_dict(old).frame_rate == 50.0
    with pytest.raises(ValueError, match="frame_rate must be one of 50, 25"):
        encoder_config("zipformer2", "tiny", frame_rate=12.5)
    with pytest.raises(ValueError, match="output_downsampling_factor must be 1"):
        encoder_config("zipformer2", "tiny", output_downsampling_factor=4)


def test_a_25hz_student_trains_on_stacked_wavlm_and_one_to_one_dasheng_targets():
    from spear.models.student import SpearObjective

    torch.manual_seed(0)
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=40, frame_rate=25)
    obj = SpearObjective(enc, {"speech": student_codebooks(4, 50.0, 25.0), "audio": student_codebooks(2, 25.0, 25.0)},
                         {"speech": 1.0, "audio": 0.1}, codebook_size=16)
    feats, lens = torch.randn(2, 207, 40), torch.tensor([207, 150])
    s_len = enc.output_lengths(lens)
    t50 = torch.div(lens, 2, rounding_mode="floor")  # 50 Hz teacher frames, 25 Hz audio-teacher frames
    speech = align_targets(torch.randint(0, 16, (2, 103, 4)), t50, 50.0, 25.0, s_len)
    audio = align_targets(torch.randint(0, 16, (2, 52, 2)), (t50 + 1) // 2, 25.0, 25.0, s_len)
    assert speech.shape[2] == 8 and audio.shape[2] == 2
    out = obj(feats, lens, {"speech": speech, "audio": audio})
    out.loss.backward()
    assert torch.isfinite(out.loss) and enc.downsample_output.bias.grad is not None


def test_student_config_offers_exactly_the_preset_sizes():
    # config/ may not import models/, so the size Literal repeats SIZES: this keeps the two equal
    from typing import get_args

    assert get_args(StudentConfig.model_fields["size"].annotation) == SIZES
    assert all(set(PRESETS[arch]) == set(SIZES) for arch in PRESETS)
