"""The SPEAR authors' released models: read (icefall .pt, transformers-style folder) and written, never
by running code from the file; used as a teacher (kind ``spear``), as a training initialisation
(``train.init_from``) and converted by ``spear convert-checkpoint``."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spear.config import TeacherConfig, TrainConfig
from spear.models.frontend import KaldiFbank
from spear.models.student import StudentModel, build_encoder
from spear.models.student.configs import ZipformerConfig
from spear.models.student.convert import HF_PREFIX, to_icefall
from spear.stages.artefacts import (export_student, initialise_encoder, load_any_student, load_spear_release,
                                    load_student, save_spear_release)
from spear.stages.teacher_loading import load_teacher

# A small Zipformer2 with the SPEAR head dims (32 / 12 / 4): its shapes alone determine its config,
# as for the authors' files, which say nothing about head dims.
SMALL = ZipformerConfig(num_mel_bins=128, downsampling_factor=(1, 2, 1), num_layers=(1, 2, 1),
                        encoder_dim=(64, 96, 64), feedforward_dim=(128, 192, 128), num_heads=2,
                        cnn_module_kernel=(7, 5, 7), subsampling_channels=(4, 8, 16))


def _wavs():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(24000) / 16000
    wavs = 0.05 * torch.randn(2, 24000, generator=g) + 0.2 * torch.sin(2 * torch.pi * 330 * t)
    wavs[1, 15000:] = 0
    return wavs, torch.tensor([24000, 15000])


@pytest.fixture(scope="module")
def trained():
    """A 'released' model: random weights moved off their initial values, in eval mode."""
    torch.manual_seed(0)
    enc = build_encoder(SMALL)
    with torch.no_grad():
        for k, p in enc.named_parameters():
            if not k.endswith(("bypass_scale", "log_scale")):
                p.add_(torch.randn_like(p) * 0.02)
    return enc.eval()


def _authors_pt(enc, path: Path) -> Path:
    """The icefall file as the authors write it: {"model": MultiKDModel state dict}, heads included."""
    state = to_icefall(enc.state_dict(), enc.config)
    state["codebook_loss_heads.0.codebook_loss_net.proj.weight"] = torch.randn(16 * 256, 64)
    state["audio_tagging_proj.1.weight"] = torch.randn(527, 96)
    torch.save({"model": state}, path)
    return path


def _reference(enc):
    """``enc`` as a StudentModel on the authors' mel band (lhotse: up to Nyquist - 400 Hz), as a release loads."""
    return StudentModel(copy.deepcopy(enc), {"frontend": KaldiFbank(num_mel_bins=enc.num_mel_bins,
                                                                      high_freq=-400.0).settings()})


def _features(model, layer=None):
    wavs, lens = _wavs()
    feats = model.features(wavs, lens)
    return feats.final if layer is None else feats.layers[layer]


def test_authors_icefall_file_loads_as_the_same_model(trained, tmp_path):
    reference = _reference(trained)
    released = load_spear_release(_authors_pt(trained, tmp_path / "iter-500000-avg-4.pt"), device="cpu")
    assert released.fbank.high_freq == -400.0  # the authors' lhotse mel band
    assert released.encoder.config == trained.config  # read from the shapes
    assert released.config["conversion"]["layout"] == "icefall"
    assert len(released.config["conversion"]["ignored"]) == 2  # the two training heads
    assert any("lhotse" in n for n in released.config["conversion"]["notes"])  # the frontend difference is said
    assert (_features(released) - _features(reference)).abs().max() < 1e-5
    assert released.config["weights_sha256"] and released.config["frame_rate"] == 50.0


def _export(enc, path):
    export_student(enc, path)
    return path


@pytest.mark.parametrize("layout", ["icefall", "hf"])
def test_written_release_reads_back_with_the_same_features(trained, tmp_path, layout):
    reference = _reference(trained)
    files = save_spear_release(trained, tmp_path / "out", layout=layout)
    if layout == "hf":
        cfg = json.loads((tmp_path / "out" / "config.json").read_text())
        assert cfg["model_type"] == "spear" and cfg["num_encoder_layers"] == "1,2,1" and cfg["encoder_dim"] == "64,96,64"
        with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert all(k.startswith(HF_PREFIX) for k in keys)
        assert HF_PREFIX + "encoder.encoders.1.encoder.layers.1.conv_module2.depthwise_conv.weight" in keys
    else:
        assert files == [str(tmp_path / "out" / "pretrained.pt")]
        obj = torch.load(files[0], weights_only=True)
        assert "encoder_embed.conv.7.weight" in obj["model"]
    back = load_any_student(tmp_path / "out", device="cpu")
    assert back.encoder.config == trained.config
    assert (_features(back) - _features(reference)).abs().max() < 1e-5
    for a, b in zip(back.features(*_wavs()).layers, reference.features(*_wavs()).layers):
        assert (a - b).abs().max() < 1e-5


class _Payload:
    """A pickle that runs code when loaded without weights_only (it creates a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_with_a_code_payload_is_refused(trained, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": to_icefall(trained.state_dict(), trained.config), "x": _Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_spear_release(evil, device="cpu")
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_spear_teacher_is_a_layer_of_the_released_model(trained, tmp_path):
    path = _authors_pt(trained, tmp_path / "spear.pt")
    teacher = load_teacher(TeacherConfig(kind="spear", path=str(path), layer=2), device="cpu")
    student = load_spear_release(path, device="cpu")
    assert teacher.name == "spear" and teacher.dim == 96 and teacher.frame_rate == 50.0
    wavs, lens = _wavs()
    torch.testing.assert_close(teacher.embed(wavs, lens), student.features(wavs, lens).layers[2])
    assert teacher.num_frames_for(24000) == int(student.features(wavs, lens).lengths[0])
    exported = load_teacher(TeacherConfig(kind="student", path=str(_export(trained, tmp_path / "e")), layer=2),
                            device="cpu")
    assert exported.version != teacher.version  # another kind and another file: other tokens


def test_init_from_copies_a_release_into_a_fresh_student(trained, tmp_path):
    path = _authors_pt(trained, tmp_path / "spear.pt")
    fresh = build_encoder(SMALL)
    info = initialise_encoder(fresh, str(path))
    assert info["layout"] == "icefall"
    ref = load_spear_release(path, device="cpu").encoder.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref[k]), k
    other = build_encoder(ZipformerConfig(**{**SMALL.__dict__, "num_layers": (1, 1, 1)}))
    with pytest.raises(ValueError, match="num_layers"):
        initialise_encoder(other, str(path))
    assert TrainConfig(init_from=str(path)).init_from == str(path)


def test_convert_checkpoint_command_both_ways(trained, tmp_path):
    src = _authors_pt(trained, tmp_path / "spear.pt")
    env = dict(os.environ, SPEAR_CACHE_DIR=str(tmp_path / "cache"))

    def spear(*args):
        return subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    r = spear("convert-checkpoint", str(src), str(tmp_path / "ours"), "--to", "spear", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["source_layout"] == "icefall" and summary["num_layers"] == 4 and len(summary["ignored"]) == 2
    r = spear("convert-checkpoint", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert "model.safetensors" in r.stdout
    assert load_student(tmp_path / "ours", device="cpu").fbank.high_freq == -400.0  # the export keeps the band
    back = load_any_student(tmp_path / "hf", device="cpu")
    reference = load_spear_release(src, device="cpu")
    assert (_features(back) - _features(reference)).abs().max() < 1e-5
    r = spear("convert-checkpoint", str(src), str(tmp_path / "x"), "--to", "onnx")
    assert r.returncode == 2 and "onnx" in r.stderr


def test_authors_transformers_folder_loads_from_its_own_config_fields(trained, tmp_path):
    """The release as the authors publish it: model.safetensors under SpearModel.model.model, and a
    config.json of SpearConfig fields (comma strings; no head dims: SPEAR's 32 / 12 / 4 are assumed,
    checked against the shapes); a config that disagrees with the weights, or a causal model, is refused."""
    from safetensors.torch import save_file

    folder = tmp_path / "spear-small-hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in to_icefall(trained.state_dict(), trained.config, prefix=HF_PREFIX).items()},
              str(folder / "model.safetensors"))
    (folder / "modeling_spear.py").write_text("raise SystemExit('the release code must never be imported')\n")
    authors = {"architectures": ["SpearModel"], "model_type": "spear", "num_mel_bins": 128, "pos_dim": 48,
               "output_downsampling_factor": 1, "downsampling_factor": "1,2,1", "num_encoder_layers": "1,2,1",
               "feedforward_dim": "128,192,128", "encoder_dim": "64,96,64", "encoder_unmasked_dim": "32,32,32",
               "cnn_module_kernel": "7,5,7", "num_heads": "2,2,2", "causal": False, "chunk_size": 8,
               "left_context_frames": 128, "auto_map": {"AutoModel": "modeling_spear.SpearModel"}}
    (folder / "config.json").write_text(json.dumps(authors))
    released = load_spear_release(folder, device="cpu")
    assert released.encoder.config == trained.config and released.config["conversion"]["layout"] == "hf"
    assert (_features(released) - _features(_reference(trained))).abs().max() < 1e-5
    (folder / "config.json").write_text(json.dumps({**authors, "num_encoder_layers": "1,1,1"}))
    with pytest.raises(ValueError, match="num_encoder_layers"):
        load_spear_release(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({**authors, "causal": True}))
    with pytest.raises(ValueError, match="causal"):
        load_spear_release(folder, device="cpu")
