"""Teachers: real loaders on small randomly initialised checkpoints saved in each real format,
compared with the reference implementations; padding invariance, frame counts, layers,
version ids, and loading from object storage."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spear.models.teachers import (DashengConfig, DashengEncoder, Teacher, file_sha256, load_dasheng_checkpoint,
                                   make_version, save_dasheng_checkpoint)
from spear.config import TeacherConfig
from spear.stages.teacher_loading import load_teacher

transformers = pytest.importorskip("transformers")

TINY_CONV = dict(conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, **TINY_CONV)


def _audio(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Padded batch (padding filled with loud noise, which must not matter) and the unpadded utterances."""
    g = torch.Generator().manual_seed(seed)
    utts = [torch.randn(n, generator=g) * 0.1 * (1 + i) for i, n in enumerate(lengths)]
    batch = torch.randn(len(lengths), max(lengths), generator=g) * 5
    for i, u in enumerate(utts):
        batch[i, : len(u)] = u
    return batch, utts


def _save_hf(path: Path, kind: str, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    if kind == "wavlm":
        cfg = transformers.WavLMConfig(**{**TINY, "num_buckets": 16, "max_bucket_distance": 40, **overrides})
        model = transformers.WavLMModel(cfg)
    else:
        cfg = transformers.HubertConfig(**{**TINY, **overrides})
        model = transformers.HubertModel(cfg)
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    out = {
        "wavlm": _save_hf(root / "wavlm", "wavlm", 0, feat_extract_norm="layer", do_stable_layer_norm=True),
        "wavlm_other": _save_hf(root / "wavlm_other", "wavlm", 1, feat_extract_norm="layer", do_stable_layer_norm=True),
        "wavlm_group": _save_hf(root / "wavlm_group", "wavlm", 2, feat_extract_norm="group", do_stable_layer_norm=False),
        "hubert": _save_hf(root / "hubert", "hubert", 3, feat_extract_norm="layer", do_stable_layer_norm=True),
    }
    torch.manual_seed(4)
    enc = DashengEncoder(DashengConfig(embed_dim=32, depth=3, num_heads=4, target_length=96))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the normalisation is exercised
        enc.init_bn.running_mean.normal_()
        enc.init_bn.running_var.uniform_(0.5, 2.0)
    save_dasheng_checkpoint(enc, root / "dasheng.pt")
    out["dasheng"] = root / "dasheng.pt"
    return out


_LOADED: dict[tuple, Teacher] = {}


def _teacher(kind: str, ckpts, layer: int | None = None, key: str | None = None) -> Teacher:
    """Loaded once per test module and (kind, checkpoint, layer): teachers are frozen and stateless."""
    path = None if kind in ("mfcc", "fbank") else str(ckpts[key or kind])
    k = (kind, path, layer)
    if k not in _LOADED:
        _LOADED[k] = load_teacher(TeacherConfig(kind=kind, path=path, layer=layer), device="cpu")
    return _LOADED[k]


ALL = [("mfcc", None), ("fbank", None), ("wavlm", None), ("wavlm", "wavlm_group"), ("hubert", None), ("dasheng", None)]
IDS = ["mfcc", "fbank", "wavlm", "wavlm-groupnorm", "hubert", "dasheng"]


@pytest.mark.parametrize("kind,key", ALL, ids=IDS)
def test_padding_and_batch_do_not_change_embeddings(kind, key, ckpts):
    teacher = _teacher(kind, ckpts, key=key)
    # 20000 samples spans two Dasheng chunks (96 mel frames = 24 tokens per chunk); 300 is too short for any frame.
    lengths = [20000, 5000, 300, 11111]
    batch, utts = _audio(lengths)
    out = teacher(batch, torch.tensor(lengths))
    assert out.num_frames.tolist() == [teacher.num_frames_for(n) for n in lengths]
    assert out.num_frames[2] == 0 and out.embeddings.shape == (4, int(out.num_frames.max()), teacher.dim)
    for b, u in enumerate(utts):
        single = teacher(u[None])
        n = int(out.num_frames[b])
        assert int(single.num_frames[0]) == n
        torch.testing.assert_close(out.embeddings[b, :n], single.embeddings[0], atol=2e-5, rtol=1e-4)
        assert bool((out.embeddings[b, n:] == 0).all())
    again = teacher(batch, torch.tensor(lengths))
    assert torch.equal(again.embeddings, out.embeddings)  # deterministic


@pytest.mark.parametrize("kind,key", ALL, ids=IDS)
def test_frame_counts_and_rates(kind, key, ckpts):
    teacher = _teacher(kind, ckpts, key=key)
    expected_rate = {"mfcc": 50.0, "fbank": 25.0, "wavlm": 50.0, "hubert": 50.0, "dasheng": 25.0}[kind]
    assert teacher.frame_rate == expected_rate
    for n in (400, 479, 480, 719, 720, 16000, 16321):
        count = teacher.num_frames_for(n)
        assert int(teacher.num_frames_for(torch.tensor([n]))[0]) == count
        assert int(teacher(torch.zeros(1, n) + 0.01 * torch.randn(1, n)).num_frames[0]) == count
        # ~frame_rate frames per second, within a frame or two of the edge effects
        assert abs(count - n / 16000 * expected_rate) <= 2
    if kind in ("mfcc", "wavlm", "hubert"):  # the speech teachers agree with each other frame for frame
        assert [teacher.num_frames_for(n) for n in (399, 400, 719, 720, 16000)] == [0, 1, 1, 2, 49]
    if kind == "dasheng":
        assert [teacher.num_frames_for(n) for n in (479, 480, 16000, 16479, 16480)] == [0, 1, 25, 25, 26]


@pytest.mark.parametrize("kind,key", [("wavlm", "wavlm"), ("wavlm", "wavlm_group"), ("hubert", "hubert")],
                         ids=["wavlm", "wavlm-groupnorm", "hubert"])
def test_hf_layers_match_transformers(kind, key, ckpts):
    cls = transformers.WavLMModel if kind == "wavlm" else transformers.HubertModel
    ref = cls.from_pretrained(str(ckpts[key])).eval()
    group = ref.config.feat_extract_norm == "group"
    lengths = [12000, 7000]
    batch, utts = _audio(lengths, seed=5)
    with torch.no_grad():
        if group:  # transformers' advice for group-norm models: no attention mask, one utterance at a time
            hs = [ref(u[None], output_hidden_states=True).hidden_states for u in utts]
            refs = {k: [h[k][0] for h in hs] for k in range(4)}
        else:  # the reference batch: transformers' feature extractor pads, normalises and masks
            fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                       do_normalize=True, return_attention_mask=True)
            inp = fe([u.numpy() for u in utts], sampling_rate=16000, padding=True, return_tensors="pt")
            hs = ref(**inp, output_hidden_states=True).hidden_states
            frames = ref._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
            refs = {k: [hs[k][b, :n] for b, n in enumerate(frames)] for k in range(4)}
    for layer in range(4):
        teacher = _teacher(kind, ckpts, layer=layer, key=key)
        assert teacher.do_normalize == (not group)  # no preprocessor_config.json: the fairseq convention
        out = teacher(batch, torch.tensor(lengths))
        for b in range(len(utts)):
            n = int(out.num_frames[b])
            assert refs[layer][b].shape[0] == n
            torch.testing.assert_close(out.embeddings[b, :n], refs[layer][b], atol=1e-4, rtol=1e-4)


def test_hf_default_layer_and_preprocessor_config(ckpts, tmp_path):
    t = _teacher("wavlm", ckpts)
    assert t.layer == 3 and len(t.model.encoder.layers) == 3  # not 24 layers: the last one
    t1 = _teacher("wavlm", ckpts, layer=1)
    assert len(t1.model.encoder.layers) == 1  # layers above the chosen one are dropped
    d = tmp_path / "wavlm_nonorm"
    d.mkdir()
    for f in ckpts["wavlm"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "preprocessor_config.json").write_text('{"do_normalize": false}')
    t2 = load_teacher(TeacherConfig(kind="wavlm", path=str(d), layer=1), device="cpu")
    assert not t2.do_normalize and t2.version != t1.version
    x = torch.randn(1, 8000) * 0.3 + 0.2
    assert not torch.allclose(t2(x).embeddings, t1(x).embeddings)
    with pytest.raises(ValueError, match="layer 4 out of range"):
        _teacher("wavlm", ckpts, layer=4)
    with pytest.raises(ValueError, match="model_type 'wavlm'"):
        _teacher("hubert", ckpts, key="wavlm")


def test_version_ids(ckpts):
    def fresh(kind, layer=None, key=None):
        return load_teacher(TeacherConfig(kind=kind, path=str(ckpts[key or kind]), layer=layer), device="cpu").version

    v = {k: _teacher("wavlm", ckpts, layer=k).version for k in (1, 2)}
    assert v[1] != v[2]  # layer
    assert fresh("wavlm", 1) == v[1]  # stable on reload
    assert _teacher("wavlm", ckpts, layer=1, key="wavlm_other").version != v[1]  # weights
    assert _teacher("hubert", ckpts, layer=1).version != v[1]
    d = {k: _teacher("dasheng", ckpts, layer=k).version for k in (2, 3)}
    assert d[2] != d[3] and fresh("dasheng", 3) == d[3]
    assert _teacher("mfcc", ckpts).version != _teacher("fbank", ckpts).version
    # exactly the hash of (kind, checkpoint files, layer, preprocessing): nothing else enters it
    w = ckpts["wavlm"]
    assert v[1] == make_version("wavlm", file_sha256([w / "config.json", w / "model.safetensors"]), 1,
                                {"do_normalize": True, "per_utterance": False})
    # the same ids in a fresh process (weights hashed from tensors for Dasheng, from files for HF)
    code = ("import sys; from spear.stages.teacher_loading import load_teacher; from spear.config import TeacherConfig;"
            "print(load_teacher(TeacherConfig(kind='dasheng', path=sys.argv[1], layer=3), device='cpu').version);"
            "print(load_teacher(TeacherConfig(kind='mfcc'), device='cpu').version)")
    res = subprocess.run([sys.executable, "-c", code, str(ckpts["dasheng"])], capture_output=True, text=True, check=True)
    assert res.stdout.split() == [d[3], _teacher("mfcc", ckpts).version]


def test_loading_from_storage(storage_root, ckpts, tmp_path):
    storage, root = storage_root
    for f in ckpts["wavlm"].iterdir():
        storage.write_bytes(f"{root}/wavlm/{f.name}", f.read_bytes())
    storage.write_bytes(f"{root}/wavlm/README.md", b"not fetched")
    storage.write_bytes(f"{root}/dasheng/dasheng_base.pt", ckpts["dasheng"].read_bytes())
    cache = tmp_path / "cache"
    x, _ = _audio([9000, 6000], seed=9)
    lengths = torch.tensor([9000, 6000])
    for kind, remote, layer in (("wavlm", f"{root}/wavlm/", 2), ("dasheng", f"{root}/dasheng/dasheng_base.pt", 2)):
        cfg = TeacherConfig(kind=kind, path=remote, layer=layer)
        remote_t = load_teacher(cfg, storage=storage, device="cpu", cache_dir=cache)
        local_t = _teacher(kind, ckpts, layer=layer)
        assert remote_t.version == local_t.version
        assert torch.equal(remote_t(x, lengths).embeddings, local_t(x, lengths).embeddings)
        assert load_teacher(cfg, storage=storage, device="cpu", cache_dir=cache).version == local_t.version  # cached
    if root.startswith("s3://"):
        fetched = sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".etag"))
        assert fetched == sorted(["config.json", "model.safetensors", "dasheng_base.pt"])
    with pytest.raises(Exception, match="does not exist|nothing"):
        load_teacher(TeacherConfig(kind="wavlm", path=f"{root}/missing/"), storage=storage, cache_dir=cache)


# ----------------------------------------------------------------------------- dasheng

PUBLISHED_KEYS_DEPTH1 = {  # read off dasheng/train/models.py (AudioTransformerMAE_Encoder, torchaudio front end)
    "front_end.0.spectrogram.window", "front_end.0.mel_scale.fb",
    "init_bn.1.weight", "init_bn.1.bias", "init_bn.1.running_mean", "init_bn.1.running_var",
    "init_bn.1.num_batches_tracked", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "time_pos_embed", "freq_pos_embed", "norm.weight", "norm.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
}


def test_dasheng_checkpoint_layout(tmp_path):
    enc = DashengEncoder(DashengConfig(embed_dim=16, depth=1, num_heads=2))
    save_dasheng_checkpoint(enc, tmp_path / "m.pt")
    dump = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(dump["model"]) == PUBLISHED_KEYS_DEPTH1
    assert dump["model"]["time_pos_embed"].shape == (1, 16, 1, 252)  # 1008 frames / 4
    assert dump["model"]["front_end.0.mel_scale.fb"].shape == (257, 64)
    cfg, state = load_dasheng_checkpoint(tmp_path / "m.pt")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (16, 1, 2, (64, 4))


def test_dasheng_published_sizes_take_published_heads(tmp_path):
    # dasheng's loaders force the head count of each published size; the config's value is ignored there.
    sd = {"patch_embed.proj.weight": torch.zeros(768, 1, 64, 4), "blocks.0.mlp.fc1.weight": torch.zeros(3072, 768)}
    sd.update({f"blocks.{i}.norm1.weight": torch.ones(768) for i in range(12)})  # the shapes that name the size
    torch.save({"model": sd, "config": {"num_heads": 3}}, tmp_path / "base.pt")
    assert load_dasheng_checkpoint(tmp_path / "base.pt")[0].num_heads == 12


class CustomConfig:  # loading any custom object means running pickle code
    embed_dim = 16


def test_dasheng_refuses_code_in_checkpoints(tmp_path):
    enc = DashengEncoder(DashengConfig(embed_dim=16, depth=1, num_heads=2))
    torch.save({"model": enc.state_dict(), "config": CustomConfig()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(ValueError, match="without executing code"):
        load_dasheng_checkpoint(tmp_path / "evil.pt")


def test_dasheng_layers(ckpts):
    full = _teacher("dasheng", ckpts)
    assert full.layer == 3 and full.dim == 32
    x, _ = _audio([30000], seed=3)
    outs = {k: _teacher("dasheng", ckpts, layer=k)(x).embeddings for k in (0, 1, 2, 3)}
    # layer k: output of block k; the last layer adds the final LayerNorm
    enc = full.encoder
    with torch.no_grad():
        blocks_out = []
        hooks = [b.register_forward_hook(lambda m, i, o: blocks_out.append(o)) for b in enc.blocks]
        final = full(x).embeddings
        for h in hooks:
            h.remove()
    torch.testing.assert_close(final, outs[3])
    for k in (1, 2):
        ref = blocks_out[k - 1].reshape(1, -1, 32)[:, : outs[k].shape[1]]  # chunks: [B * n, C, D] -> [B, n * C, D]
        torch.testing.assert_close(outs[k], ref)
    last = blocks_out[2].reshape(1, -1, 32)[:, : outs[3].shape[1]]
    torch.testing.assert_close(outs[3], torch.nn.functional.layer_norm(last, (32,), enc.norm.weight, enc.norm.bias, 1e-6))
    assert not torch.allclose(outs[2], outs[3]) and not torch.allclose(outs[0], outs[1])


def test_dasheng_matches_reference_package(tmp_path):
    dasheng = pytest.importorskip("dasheng.pretrained.pretrained",
                                  reason="the dasheng package imports torchaudio, which does not import here")
    torch.manual_seed(0)
    ref = dasheng.Dasheng(embed_dim=64, depth=2, num_heads=4, target_length=96).eval()
    with torch.no_grad():
        ref.init_bn[1].running_mean.normal_()
        ref.init_bn[1].running_var.uniform_(0.5, 2.0)
    torch.save({"model": ref.state_dict(), "config": {"embed_dim": 64, "depth": 2, "num_heads": 4,
                                                      "target_length": 96}}, tmp_path / "ref.pt")
    teacher = load_teacher(TeacherConfig(kind="dasheng", path=str(tmp_path / "ref.pt")), device="cpu")
    lengths = [48123, 9000, 30000]
    batch, utts = _audio(lengths, seed=2)
    out = teacher(batch, torch.tensor(lengths))
    for b, u in enumerate(utts):
        with torch.no_grad():
            r = ref(u[None])[0]  # the reference on one unpadded utterance
        n = int(out.num_frames[b])
        assert r.shape[0] == n
        torch.testing.assert_close(out.embeddings[b, :n], r, atol=1e-4, rtol=1e-4)


def test_dasheng_front_end_matches_torchaudio():
    T = pytest.importorskip("torchaudio.transforms", reason="torchaudio does not import here (GPU machines only)")
    enc = DashengEncoder(DashengConfig(embed_dim=16, depth=1, num_heads=2))
    mel = T.MelSpectrogram(f_min=0, sample_rate=16000, win_length=512, center=True, n_fft=512, f_max=8000,
                           hop_length=160, n_mels=64)
    torch.testing.assert_close(enc.front_end.fb, mel.mel_scale.fb)
    x = torch.randn(1, 20000) * 0.1
    ref = T.AmplitudeToDB(top_db=120)(mel(x))
    ours, _ = enc.front_end(x, torch.tensor([20000]))
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


def test_student_teacher_is_a_trained_students_layer(tmp_path):
    from spear.models.student import build_encoder
    from spear.stages.artefacts import export_student, load_student

    torch.manual_seed(0)
    export_student(build_encoder("zipformer2", "tiny", num_mel_bins=128), str(tmp_path / "student"))
    teacher = load_teacher(TeacherConfig(kind="student", path=str(tmp_path / "student"), layer=2), device="cpu")
    student = load_student(str(tmp_path / "student"))
    wavs, lens = torch.randn(2, 24000) * 0.1, torch.tensor([24000, 15000])
    out = teacher(wavs, lens)
    want = student.features(wavs, lens)
    assert teacher.frame_rate == student.frame_rate and teacher.dim == student.layer_dims[2]
    assert out.num_frames.tolist() == want.lengths.tolist()
    for b, n in enumerate(out.num_frames.tolist()):
        torch.testing.assert_close(out.embeddings[b, :n], want.layers[2][b, :n], atol=1e-5, rtol=1e-5)
    # padding does not change an utterance's embeddings
    single = teacher(wavs[1:, :15000], lens[1:])
    torch.testing.assert_close(single.embeddings[0, : out.num_frames[1]], out.embeddings[1, : out.num_frames[1]],
                               atol=1e-4, rtol=1e-4)
    other = load_teacher(TeacherConfig(kind="student", path=str(tmp_path / "student"), layer=3), device="cpu")
    assert other.version != teacher.version
    with pytest.raises(ValueError, match="out of range"):
        load_teacher(TeacherConfig(kind="student", path=str(tmp_path / "student"), layer=99))


def test_layer_errors(ckpts):
    with pytest.raises(ValueError, match="has no layers"):
        load_teacher(TeacherConfig(kind="mfcc", layer=3))
    with pytest.raises(ValueError, match="out of range"):
        _teacher("dasheng", ckpts, layer=7)
