"""The post-trained export: a student export plus the heads; loading gives the same embeddings."""

from __future__ import annotations

import json
import os

import pytest
import torch

from spear.models.posttrain import AttributeSpec, PostTrainModel
from spear.models.student import build_encoder, build_student, export_fields, export_state
from spear.stages.artefacts import (export_posttrained, is_posttrained_export, load_posttrained, load_student,
                                    load_any_student)


def _model(seed: int = 0) -> PostTrainModel:
    torch.manual_seed(seed)
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    student = build_student(export_fields(enc), export_state(enc), device="cpu")
    specs = [AttributeSpec("speaker", "speaker", dim=16, num_classes=3, pool_hidden=8),
             AttributeSpec("meaning", "semantic", dim=32, pool_hidden=8),
             AttributeSpec("count", "counting", dim=8, tasks={"tones": 6, "higher": 2}, pool_hidden=8,
                           time_context=True)]
    model = PostTrainModel(student, specs, freeze="top", trainable_layers=1, input_layer=True)
    with torch.no_grad():  # heads away from their initialisation, so a load that ignores them shows
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_exported_model_gives_the_in_memory_embeddings(storage_root, tmp_path, monkeypatch):
    st, root = storage_root
    model = _model()
    if root.startswith("s3://"):
        dest = f"{root}/model"
    else:  # a relative path from another working directory
        monkeypatch.chdir(tmp_path)
        dest = "rel/model"
    config = export_posttrained(model, dest, metadata={"speakers": ["a", "b", "c"]}, storage=st)
    assert config["model"]["input_layer"] is True and config["metadata"]["speakers"] == ["a", "b", "c"]
    loaded = load_posttrained(dest, storage=st, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert loaded.posttrain_info["metadata"]["speakers"] == ["a", "b", "c"]
    assert not loaded.training and loaded.input_layer and loaded.freeze == "top"
    wavs = torch.randn(3, 20000) * 0.1
    lengths = torch.tensor([20000, 15000, 9000])
    with torch.no_grad():
        want = model(wavs, lengths).embeddings
        got = loaded(wavs, lengths).embeddings
    assert set(got) == {"speaker", "meaning", "count"}
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    # the folder is a student export too: the encoder alone loads with the student readers
    if not root.startswith("s3://"):
        assert is_posttrained_export(dest)
        enc = load_any_student(dest, device="cpu").encoder.state_dict()
        for k, v in model.student.encoder.state_dict().items():
            assert torch.equal(enc[k], v), k


def test_load_posttrained_refuses_a_plain_student_and_a_modified_head_file(tmp_path):
    model = _model()
    plain = tmp_path / "plain"
    from spear.stages.artefacts import export_student

    export_student(model.student, str(plain))
    assert not is_posttrained_export(plain)
    with pytest.raises(FileNotFoundError, match="posttrain.json is missing.*load_student"):
        load_posttrained(str(plain), device="cpu")
    d = tmp_path / "pt"
    export_posttrained(model, str(d))
    assert load_student(str(d), device="cpu").config["metadata"]["posttrained"] is True
    heads = d / "posttrain.safetensors"
    heads.write_bytes(heads.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="does not match the hash"):
        load_posttrained(str(d), device="cpu")
    cfg = json.loads((d / "posttrain.json").read_text())
    cfg["format_version"] = 99
    (d / "posttrain.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="99"):
        load_posttrained(str(d), device="cpu")
    assert os.path.exists(d / "model.safetensors")
