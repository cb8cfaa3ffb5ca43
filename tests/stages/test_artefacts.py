"""Student exports on storage (export_student / load_student): safetensors + JSON, identical features,
local disk and S3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from spear.models.frontend import KaldiFbank
from spear.models.student import SpearObjective, StudentModel, build_encoder
from spear.stages.artefacts import export_student, load_student


def _wavs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([16000, 11000, 5000])
    t = torch.arange(16000) / 16000
    wavs = 0.1 * torch.randn(3, 16000, generator=g) + 0.2 * torch.sin(2 * torch.pi * 440 * t)
    for b, n in enumerate(lengths.tolist()):
        wavs[b, n:] = 0
    return wavs, lengths


@pytest.mark.parametrize("arch", ["zipformer2", "transformer"])
def test_exported_student_gives_the_in_memory_features(storage_root, arch, tmp_path):
    storage, root = storage_root
    torch.manual_seed(0)
    enc = build_encoder(arch, "tiny", num_mel_bins=80)
    with torch.no_grad():  # move away from the init so a load that kept the init would show
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    obj = SpearObjective(enc, {"speech": 16})
    uri = f"{root}/students/{arch}"
    written = export_student(obj, uri, metadata={"step": 1234}, storage=storage)  # heads are not exported
    assert json.loads(storage.read_text(f"{uri}/config.json")) == written
    assert written["encoder"]["architecture"] == arch and written["metadata"] == {"step": 1234}
    assert written["layer_dims"] == enc.layer_dims and written["frame_rate"] == enc.frame_rate

    student = load_student(uri, storage=storage, device="cpu", cache_dir=tmp_path / "cache")
    wavs, lengths = _wavs()
    got = student.features(wavs, lengths)
    enc.eval()
    feats, n = KaldiFbank(80)(wavs, lengths)
    ref = enc(feats, n, return_layers=True)
    assert torch.equal(got.lengths, ref.lengths)
    assert torch.equal(got.lengths, student.num_frames_for(lengths))
    assert len(got.layers) == enc.num_layers
    for a, b in zip(got.layers, ref.layers):
        assert torch.equal(a, b)
    assert torch.equal(got.final, ref.frames)
    for name, t in enc.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[name], t)


def test_export_is_safetensors_with_json_config(tmp_path):
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    export_student(enc, tmp_path / "s")
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "s" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "spear-student"
        assert set(f.keys()) == set(enc.state_dict())
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["frontend"]["num_mel_bins"] == 80 and cfg["num_parameters"] == enc.num_parameters()


def test_load_rejects_what_is_not_a_student(tmp_path):
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    export_student(enc, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    with pytest.raises(FileNotFoundError):
        load_student(tmp_path / "missing")
    bad = dict(cfg, format="something-else")
    (tmp_path / "s" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not a SPEAR student"):
        load_student(tmp_path / "s")
    other = dict(cfg, encoder=dict(cfg["encoder"], num_layers=[2, 1, 1, 1, 1]))
    (tmp_path / "s" / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="weights do not match"):
        load_student(tmp_path / "s")


def test_features_of_clips_too_short_for_a_frame():
    # 900 samples = 4 fbank frames: fewer than the subsampling needs, so no output frame, and no error
    student = StudentModel(build_encoder("transformer", "tiny", num_mel_bins=80))
    out = student.features(torch.randn(2, 900) * 0.1, torch.tensor([900, 500]))
    assert out.lengths.tolist() == [0, 0]
    assert student.num_frames_for(torch.tensor([900, 500])).tolist() == [0, 0]
    assert all(not y.any() for y in out.layers)
