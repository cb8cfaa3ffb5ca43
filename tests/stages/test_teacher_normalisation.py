"""Per-teacher MVQ normalisation (teachers.ROLE.normalize): the authors' defaults, the setting
reaching the fit, and codebooks fitted with the other normalisation never used in their place
(another folder, another codebook version, another token version; reuse and stored codebooks checked)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from spear.cluster.storage import Storage
from spear.config import ConfigError, SpearConfig, TeacherConfig, load_config
from spear.pipeline import codebooks as cbmod
from spear.schemas.shards import token_version
from spear.stages.quantize import FrameSample, codebook_uri, fit_quantizer


def test_authors_defaults_wavlm_normalised_dasheng_raw_and_override():
    assert TeacherConfig(kind="wavlm", path="w").normalize_features is True
    assert TeacherConfig(kind="dasheng", path="d").normalize_features is False
    assert TeacherConfig(kind="mfcc").normalize_features is True  # the demo's teachers keep their codebooks
    assert TeacherConfig(kind="dasheng", path="d", normalize=True).normalize_features is True
    assert TeacherConfig(kind="wavlm", path="w", normalize=False).normalize_features is False
    cfg = load_config(None, overrides=["teachers.speech.normalize=false"])
    assert cfg.teachers.speech.normalize is False and cfg.teachers.speech.normalize_features is False


def _sample(dim=6, n=1200, seed=0) -> FrameSample:
    rng = np.random.default_rng(seed)
    # channels of very different scales: normalisation changes what the codebooks fit
    frames = (rng.standard_normal((n, dim)) * np.geomspace(0.1, 30, dim)).astype(np.float32)
    return FrameSample(train=frames[:1000], heldout=frames[1000:], segments=10, audio_seconds=40.0, sources={"a": 10})


def _fit(normalize: bool):
    return fit_quantizer(_sample(), num_codebooks=2, codebook_size=16, seed=0, teacher_id="t" * 16, layer=None,
                         extra={}, normalize=normalize)


def test_normalisation_reaches_the_fit_and_changes_the_codebook_version():
    raw, norm = _fit(False), _fit(True)
    assert raw.normalize is False and norm.normalize is True
    assert raw.metadata["normalize"] is False and norm.metadata["normalize"] is True
    assert raw.version != norm.version
    # normalised codebooks keep the folder they always had; raw ones get their own
    assert codebook_uri("/o", "audio", "t" * 16, 2, 16) == codebook_uri("/o", "audio", "t" * 16, 2, 16, normalize=True)
    assert codebook_uri("/o", "audio", "t" * 16, 2, 16, normalize=False).endswith("-2x16-raw")


def test_token_version_changes_only_for_raw_embeddings():
    cfg = SpearConfig()
    speech = TeacherConfig(kind="mfcc")
    key = cbmod.codebook_key(cfg, "speech", speech, "tv1")
    # a normalised teacher's key is the one token versions always had: existing datasets stay valid
    assert key == {"teacher": "tv1", "num_codebooks": 16, "codebook_size": 256}
    raw = cbmod.codebook_key(cfg, "speech", TeacherConfig(kind="mfcc", normalize=False), "tv1")
    assert raw == {**key, "normalize": False}
    assert token_version({}, {"speech": key}) != token_version({}, {"speech": raw})


class _RInfo:
    gpus = 0


def test_fit_codebooks_fits_with_the_role_setting_and_reuse_or_load_never_mixes_them(tmp_path, monkeypatch):
    storage = Storage()
    cfg = load_config(None, overrides=["mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.refine_iters=1",
                                          "mvq.kmeans_points_per_centroid=32", "mvq.kmeans_dim_steps=3"])
    monkeypatch.setattr(cbmod, "sample_teacher_frames", lambda *a, **k: _sample())
    monkeypatch.setattr(cbmod, "_save_usage_plot", lambda *a, **k: None)
    desc = {"name": "dasheng-base", "version": "d" * 16, "dim": 6, "frame_rate": 25.0}
    dasheng = TeacherConfig(kind="dasheng", path="d")
    objects = pa.table({"domain": ["audio"]})
    shape = cbmod.codebook_shape(cfg, "audio")
    out = str(tmp_path / "out")
    raw_uri = codebook_uri(out, "audio", desc["version"], *shape, normalize=False)
    cb, _ = cbmod.fit_codebooks(cfg, "audio", dasheng, desc, objects, raw_uri, storage, None, _RInfo(),
                                lambda line: None, lambda roles: ({"audio": {}}, cfg.decode))
    assert cb.normalize is False and cb.fitted_now
    from spear.stages.artefacts import load_quantizer

    fit = load_quantizer(raw_uri, storage=storage).metadata["fit"]
    # the mvq fit settings are the ones used
    assert (fit["refine_iters"], fit["max_points_per_centroid"], fit["progressive_dim_steps"]) == (1, 32, 3)
    loaded = cbmod.load_codebooks("audio", raw_uri, desc, shape, storage, None, "tv", normalize=False)
    assert loaded.version == cb.version and loaded.normalize is False
    # asked for normalised codebooks, the raw ones are refused with the way on, never used silently
    with pytest.raises(ConfigError, match="fitted on raw .* teachers.audio.normalize=false"):
        cbmod.load_codebooks("audio", raw_uri, desc, shape, storage, None, "tv", normalize=True)
    # reuse: a dataset holding only raw codebooks has none for a normalised fit ...
    other = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="reusable only for the same teacher version, shape and normalisation"):
        cbmod.reuse_codebooks("audio", out, codebook_uri(other, "audio", desc["version"], *shape), desc, shape,
                              storage, "tv2", normalize=True)
    # ... and is reused for a raw one
    reused = cbmod.reuse_codebooks("audio", out, codebook_uri(other, "audio", desc["version"], *shape, normalize=False),
                                   desc, shape, storage, "tv2", normalize=False)
    assert reused.version == cb.version and reused.reused_from.endswith("-raw")
