"""The HEAR 2021 API module and the s3prl-style upstream on freshly exported tiny students."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear.evaluation import hear
from spear.models.student import build_encoder
from spear.stages.artefacts import export_student, load_student


@pytest.fixture(scope="module", params=["zipformer2", "transformer"])
def exported(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp(f"hear-{request.param}") / "student"
    with torch.random.fork_rng():
        torch.manual_seed(7)
        export_student(build_encoder(request.param, "tiny"), str(path))
    return str(path)


def _audio(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000.0
    tone = torch.sin(2 * torch.pi * 440.0 * t)
    return (0.3 * tone + 0.05 * torch.randn(n, len(t), generator=g)).clamp(-1, 1).float()


def test_load_model_attributes(exported):
    model = hear.load_model(exported)
    student = load_student(exported, device="cpu")
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == student.encoder.output_dim
    assert hear.load_model(exported, layer=2).timestamp_embedding_size == student.layer_dims[1]
    assert hear.load_model(exported, layer="2").layer == 2  # from a command line's JSON options
    assert hear.load_model(exported, layer="all").timestamp_embedding_size == sum(student.layer_dims)
    with pytest.raises(ValueError, match="out of range"):
        hear.load_model(exported, layer=student.num_layers + 1)
    with pytest.raises(ValueError, match="model_file_path"):
        hear.load_model("")


def test_timestamp_embeddings_shapes_dtypes_and_times(exported):
    model = hear.load_model(exported)
    audio = _audio(3, 1.5)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    n_frames = int(model.student.num_frames_for(audio.shape[1]))
    assert emb.shape == (3, n_frames, model.timestamp_embedding_size) and emb.dtype == torch.float32
    assert ts.shape == (3, n_frames) and ts.dtype == torch.float32
    assert torch.isfinite(emb).all() and emb.abs().sum() > 0
    step = np.diff(ts[0].numpy())
    assert np.all(step > 0) and np.allclose(step, 1000.0 / model.frame_rate)
    assert torch.equal(ts[0], ts[2])
    # frame centres: the first frame sees fbank frames 0..6 (centre frame 3: 30 ms + half a 25 ms window)
    assert ts[0, 0].item() == pytest.approx(42.5)
    # the last frame's centre lies inside the audio
    assert ts[0, -1].item() < 1000.0 * audio.shape[1] / 16000


def test_scene_embedding_is_the_mean_over_time(exported):
    model = hear.load_model(exported)
    audio = _audio(2, 1.0, seed=1)
    scene = hear.get_scene_embeddings(audio, model)
    emb, _ = hear.get_timestamp_embeddings(audio, model)
    assert scene.shape == (2, model.scene_embedding_size) and scene.dtype == torch.float32
    torch.testing.assert_close(scene, emb.mean(dim=1))
    # different sounds, different embeddings
    assert not torch.allclose(scene[0], scene[1])


def test_batching_does_not_change_embeddings(exported, monkeypatch):
    model = hear.load_model(exported, layer=1)
    audio = _audio(4, 1.0, seed=2)
    whole, _ = hear.get_timestamp_embeddings(audio, model)
    monkeypatch.setattr(hear, "MAX_BATCH_SECONDS", 1.5)  # one sound per forward pass
    split, _ = hear.get_timestamp_embeddings(audio, model)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=1e-4)
    # the chosen layer is the student's layer 1
    direct = model.student.features(audio, torch.full((4,), audio.shape[1])).layers[0]
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=1e-4)


def test_short_and_empty_inputs(exported):
    model = hear.load_model(exported)
    emb, ts = hear.get_timestamp_embeddings(torch.zeros(0, 16000), model)
    assert emb.shape == (0, int(model.student.num_frames_for(16000)), model.timestamp_embedding_size)
    tiny = torch.zeros(2, 100)  # shorter than one fbank window
    emb, ts = hear.get_timestamp_embeddings(tiny, model)
    assert emb.shape[1] == ts.shape[1] == 0
    assert hear.get_scene_embeddings(tiny, model).shape == (2, model.scene_embedding_size)


def test_s3prl_style_upstream(exported):
    up = hear.SpearUpstream(exported, device="cpu")
    wavs = [_audio(1, 1.0, seed=3)[0], _audio(1, 0.6, seed=4)[0]]
    out = up(wavs)
    student = up.student
    assert len(out["hidden_states"]) == student.num_layers
    lengths = out["lengths"].tolist()
    assert lengths == [int(student.num_frames_for(16000)), int(student.num_frames_for(9600))]
    for h, d in zip(out["hidden_states"], student.layer_dims):
        assert h.shape == (2, lengths[0], d)
        assert h[1, lengths[1]:].abs().max() == 0  # padding frames are zeros
    assert up.get_downsample_rates("hidden_states") == int(16000 / student.frame_rate)
    # padding does not change the shorter utterance's features
    alone = up([wavs[1]])["hidden_states"][-1]
    torch.testing.assert_close(out["hidden_states"][-1][1, : lengths[1]], alone[0], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- post-trained exports


@pytest.fixture(scope="module")
def posttrained(tmp_path_factory) -> tuple[str, str]:
    """(a post-trained export, the plain student export it started from)."""
    from spear.models.posttrain import AttributeSpec, PostTrainModel
    from spear.stages.artefacts import export_posttrained

    root = tmp_path_factory.mktemp("hear-posttrained")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        export_student(build_encoder("zipformer2", "tiny"), str(root / "input"))
        model = PostTrainModel(load_student(str(root / "input"), device="cpu"),
                               [AttributeSpec("speaker", "speaker", dim=12, num_classes=5),
                                AttributeSpec("count", "counting", dim=6, tasks={"tones": 4})], input_layer=True)
    export_posttrained(model, str(root / "model"), metadata={"speakers": ["a", "b", "c", "d", "e"]})
    return str(root / "model"), str(root / "input")


def test_attribute_scene_embeddings(posttrained):
    from spear.stages.artefacts import load_posttrained

    path, _ = posttrained
    model = hear.load_model(path, attribute="speaker")
    assert model.scene_embedding_size == 12 and hear.load_model(path, attribute="count").scene_embedding_size == 6
    assert model.timestamp_embedding_size == model.student.encoder.output_dim
    audio = _audio(3, 1.2, seed=5)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 12) and scene.dtype == torch.float32
    # the attribute head's embedding of the whole sound, as the post-trained model gives it
    direct = load_posttrained(path, device="cpu")(audio, torch.full((3,), audio.shape[1])).embeddings["speaker"]
    torch.testing.assert_close(scene, direct, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(scene[0], scene[1])
    # timestamp embeddings stay the encoder's frames; without attribute, the scene is their mean
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    plain = hear.load_model(path)
    torch.testing.assert_close(emb, hear.get_timestamp_embeddings(audio, plain)[0])
    torch.testing.assert_close(hear.get_scene_embeddings(audio, plain), emb.mean(dim=1))
    assert hear.get_scene_embeddings(torch.zeros(0, 16000), model).shape == (0, 12)


def test_attribute_batching_and_errors(posttrained, monkeypatch):
    path, plain = posttrained
    model = hear.load_model(path, attribute="speaker", layer=2)
    audio = _audio(4, 1.0, seed=6)
    whole = hear.get_scene_embeddings(audio, model)
    monkeypatch.setattr(hear, "MAX_BATCH_SECONDS", 1.5)  # one sound per forward pass
    torch.testing.assert_close(whole, hear.get_scene_embeddings(audio, model), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attribute 'semantic'.*speaker, count"):
        hear.load_model(path, attribute="semantic")
    with pytest.raises(ValueError, match="needs a post-trained export"):
        hear.load_model(plain, attribute="speaker")
