"""The packaged recipes (config/recipes/*.yaml): each loads through the real config loader, by name
and by path, validates, and holds the authors' settings for its size and data mix."""

from __future__ import annotations

import pytest
import torch

from spear.config import ConfigError, load_config
from spear.config.loading import recipe_names, recipe_path
from spear.models.student import build_encoder
from spear.models.student.targets import student_codebooks

SIZES = {"spear-base": 93e6, "spear-large": 327e6, "spear-600m": 600e6}
RECIPES = [f"{size}-{mix}" for size in SIZES for mix in ("speech", "unified")]


def test_every_size_has_a_speech_only_and_a_unified_recipe():
    assert recipe_names() == sorted(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_by_name_and_by_path_and_holds_the_authors_settings(name):
    cfg = load_config(name)
    assert cfg == load_config(str(recipe_path(name)))
    size, mix = name.rsplit("-", 1)
    t = cfg.train
    assert t.student.architecture == "zipformer2" and t.student.size == size and t.student.num_mel_bins == 128
    assert (t.student.whitening_limit, t.student.whitening_grad_scale, t.student.whitening_prob) == (4.0, 0.01, 0.25)
    assert t.optimizer_kind == "scaled_adam" and t.scaled_adam.base_lr in (0.045, 0.04)
    assert t.scaled_adam.lr_batches == 7500 and t.warmup_steps == 500 and t.audio_loss_weight == 0.1
    assert (t.masking.mask_length, t.masking.channel_mask_prob) == (10, 0.25)
    speech = cfg.teachers.speech
    assert (speech.kind, speech.layer, speech.normalize_features) == ("wavlm", 21, True)
    assert (cfg.mvq.speech_codebooks, cfg.mvq.audio_codebooks, cfg.mvq.codebook_size) == (16, 8, 256)
    if mix == "unified":
        # 25 Hz student: WavLM's 50 Hz tokens two frames per student frame, Dasheng's 25 Hz ones 1:1
        assert t.student.frame_rate == 25 and cfg.teachers.audio.kind == "dasheng"
        assert cfg.teachers.audio.normalize_features is False and cfg.teachers.audio.layer is None
        assert (t.masking.mask_prob, t.masking.channel_mask_length) == (0.65, 20)
        assert student_codebooks(16, 50.0, t.student.frame_rate) == 32
        assert student_codebooks(8, 25.0, t.student.frame_rate) == 8
    else:
        assert t.student.frame_rate == 50 and cfg.teachers.audio is None
        assert (t.masking.mask_prob, t.masking.channel_mask_length) == (0.5, 15)
    with torch.device("meta"):
        enc = build_encoder(t.student)
    assert enc.frame_rate == float(t.student.frame_rate)
    assert abs(enc.num_parameters() - SIZES[size]) / SIZES[size] < 0.01


def test_overrides_apply_over_a_recipe_and_unknown_names_say_what_exists():
    cfg = load_config("spear-base-unified", overrides=["teachers.speech.path=s3://b/wavlm", "train.max_steps=10"])
    assert cfg.teachers.speech.path == "s3://b/wavlm" and cfg.train.max_steps == 10
    assert cfg.train.student.size == "spear-base"
    with pytest.raises(ConfigError, match="does not exist .*spear-base-unified"):
        load_config("spear-huge-unified")
    with pytest.raises(ConfigError, match="no packaged recipe 'spear-huge'"):
        recipe_path("spear-huge")


def test_a_file_of_the_same_name_wins_over_the_packaged_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spear-base-unified").write_text("train: {max_steps: 7}\n")
    assert load_config("spear-base-unified").train.max_steps == 7
