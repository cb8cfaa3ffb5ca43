"""Teacher stage: on a real Ray cluster with FLAC segments, the stage's embeddings (or tokens)
equal the teacher called directly on the same audio; duration batching and pool sizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear.stages.teacher_loading import load_teacher
from spear.config import TeacherConfig
from spear.stages.audio import flac_decode, flac_encode, float_to_pcm16
from spear.stages.batching import plan_subbatches
from spear.stages.teacher import (TEACHER_ACTOR_RESTARTS, GiB, MiB, TeacherFootprint, TeacherStage, TeacherStats,
                                  map_teacher_stage, plan_teacher_pool, teacher_stage_kwargs)

LENGTHS = [16000, 4000, 9000, 300, 23456, 12000, 7000]


def _segments(lengths=LENGTHS) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(lengths):
        x = (np.sin(np.arange(n) * (0.01 + 0.003 * i)) * 0.3 + rng.normal(0, 0.02, n)).astype(np.float32)
        rows.append({"segment_id": f"seg{i:02d}", "domain": "speech", "num_samples": n, "duration": n / 16000,
                     "audio": flac_encode(float_to_pcm16(x))})
    return rows


def _direct(cfg: TeacherConfig, rows: list[dict]) -> list[np.ndarray]:
    teacher = load_teacher(cfg, device="cpu")
    out = []
    for r in rows:
        x = torch.from_numpy(flac_decode(r["audio"]))[None]
        res = teacher(x)
        out.append(res.embeddings[0, : int(res.num_frames[0])].numpy())
    return out


def byte_codes(frames: torch.Tensor) -> torch.Tensor:
    """A real (if crude) 2-codebook quantiser: the index of the largest of the first 256 dims and the
    bucket of the frame's mean. Module-level so Ray can pickle it."""
    a = frames[:, :256].argmax(dim=1)
    b = ((frames.mean(dim=1).clamp(-8, 8) + 8) * 15.9).long()
    return torch.stack([a, b], dim=1).to(torch.uint8)


def test_stage_on_ray_equals_direct_teacher(ray_cluster):
    import ray

    rows = _segments()
    cfg = TeacherConfig(kind="mfcc", batch_seconds=1.5)
    ds = ray.data.from_items(rows).map_batches(
        TeacherStage, fn_constructor_kwargs={"teacher": cfg, "column_prefix": "speech", "num_threads": 1},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), batch_size=4, num_cpus=1)
    out = {r["segment_id"]: r for r in ds.take_all()}
    direct = _direct(cfg, rows)
    assert sorted(out) == [r["segment_id"] for r in rows]
    for r, ref in zip(rows, direct):
        got = out[r["segment_id"]]
        assert got["speech_num_frames"] == ref.shape[0] and got["num_samples"] == r["num_samples"]
        emb = np.asarray(got["speech_emb"], dtype=np.float32)
        assert emb.shape == (ref.size,)
        np.testing.assert_allclose(emb.reshape(ref.shape), ref, atol=1e-4, rtol=1e-5)
        assert got["audio"] == r["audio"]  # input columns pass through
    assert out["seg03"]["speech_num_frames"] == 0  # 300 samples: shorter than one frame


def byte_codes_factory(teacher):
    """Built inside the actor, after the teacher: checks it sees the loaded teacher."""
    assert teacher.name == "fbank" and teacher.dim == 128
    return byte_codes


@pytest.mark.parametrize("hook", ["encode", "encode_factory"])
def test_stage_with_encode_hook_on_ray(ray_cluster, hook):
    import ray

    rows = _segments()
    cfg = TeacherConfig(kind="fbank", batch_seconds=2.0)
    fn = byte_codes if hook == "encode" else byte_codes_factory
    ds = ray.data.from_items(rows).map_batches(
        TeacherStage, fn_constructor_kwargs={"teacher": cfg.model_dump(), "column_prefix": "audio_teacher",
                                             hook: fn, "num_threads": 1},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), batch_size=3, num_cpus=1)
    out = {r["segment_id"]: r for r in ds.take_all()}
    for r, ref in zip(rows, _direct(cfg, rows)):
        got = out[r["segment_id"]]
        assert "audio_teacher_emb" not in got
        tokens = np.frombuffer(got["audio_teacher_tokens"], dtype=np.uint8).reshape(-1, 2)
        assert tokens.shape[0] == got["audio_teacher_num_frames"] == ref.shape[0]
        np.testing.assert_array_equal(tokens, byte_codes(torch.from_numpy(ref)).numpy())


def test_subbatches_by_duration_and_padding_stats():
    lengths = np.array([100, 900, 500, 1000, 120, 480])
    plan = plan_subbatches(lengths, max_samples=2000)
    assert [lengths[b].tolist() for b in plan] == [[1000, 900], [500, 480, 120, 100]]
    assert plan_subbatches(np.array([5000, 10]), 2000)[0].tolist() == [0]  # too long: runs alone
    stage = TeacherStage(TeacherConfig(kind="mfcc", batch_seconds=1.0), device="cpu")
    rows = _segments()
    batch = {k: np.array([r[k] for r in rows], dtype=object if k == "audio" else None) for k in rows[0]}
    out = stage(batch)
    direct = _direct(TeacherConfig(kind="mfcc"), rows)
    for i, ref in enumerate(direct):
        np.testing.assert_allclose(out["speech_emb"][i].reshape(ref.shape), ref, atol=1e-4, rtol=1e-5)
    s = stage.stats
    assert s.segments == len(rows) and s.samples == sum(LENGTHS) and s.frames == sum(d.shape[0] for d in direct)
    # recompute the padding of the same plan by hand
    padded = sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b)
                 for b in plan_subbatches(np.array(LENGTHS), 16000))
    assert s.padded_samples == padded and s.batches == len(plan_subbatches(np.array(LENGTHS), 16000))
    assert 0 < s.padding_waste < 0.5
    assert TeacherStats().padding_waste == 0.0


def test_stage_rejects_wrong_num_samples():
    stage = TeacherStage(TeacherConfig(kind="mfcc"), device="cpu")
    rows = _segments([8000])
    batch = {"segment_id": np.array(["a"]), "audio": np.array([rows[0]["audio"]], dtype=object),
             "num_samples": np.array([7999])}
    with pytest.raises(ValueError, match="segment a: audio decodes to 8000 samples"):
        stage(batch)


def test_pool_plan_from_resources():
    gpu = plan_teacher_pool(TeacherConfig(kind="wavlm", path="/m", num_gpus=0.5), {"CPU": 64, "GPU": 4})
    assert (gpu.max_actors, gpu.num_gpus, gpu.num_cpus) == (8, 0.5, 1.0)
    cpu = plan_teacher_pool(TeacherConfig(kind="mfcc"), {"CPU": 16})
    assert (cpu.max_actors, cpu.num_gpus) == (8, 0.0)
    assert plan_teacher_pool(TeacherConfig(kind="mfcc"), {"CPU": 1}).max_actors == 1
    assert plan_teacher_pool(TeacherConfig(kind="mfcc"), {"CPU": 16}, actors=3).max_actors == 3
    assert plan_teacher_pool(TeacherConfig(kind="mfcc", batch_seconds=120), {"CPU": 2}).batch_size == 96
    kw = gpu.map_batches_kwargs()
    assert kw["num_gpus"] == 0.5 and kw["batch_size"] == gpu.batch_size and kw["compute"].max_size == 8
    assert "num_gpus" not in cpu.map_batches_kwargs()
    # a CPU actor runs torch on the CPUs its pool has per actor (Ray would start it on one thread); a GPU actor as set
    assert (cpu.num_threads, gpu.num_threads, "fn_constructor_kwargs" in kw) == (2, None, False)
    assert plan_teacher_pool(TeacherConfig(kind="mfcc"), {"CPU": 16}, actors=3).num_threads == 5
    assert plan_teacher_pool(TeacherConfig(kind="mfcc"), {"CPU": 1}).num_threads == 1
    stage_kw = teacher_stage_kwargs(cpu.map_batches_kwargs(), teacher="t", column_prefix="speech")
    assert stage_kw["fn_constructor_kwargs"] == {"num_threads": 2, "teacher": "t", "column_prefix": "speech"}
    assert stage_kw["compute"].max_size == cpu.max_actors


@pytest.mark.slow
def test_stage_loads_a_checkpoint_teacher_in_the_actor(ray_cluster, tmp_path):
    import ray

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                   conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                   num_buckets=16, max_bucket_distance=40, feat_extract_norm="layer",
                                   do_stable_layer_norm=True)
    transformers.WavLMModel(cfg).save_pretrained(tmp_path / "wavlm")
    teacher_cfg = TeacherConfig(kind="wavlm", path=str(tmp_path / "wavlm"), layer=1, batch_seconds=2.0)
    rows = _segments(LENGTHS[:4])
    ds = ray.data.from_items(rows).map_batches(
        TeacherStage, fn_constructor_kwargs={"teacher": teacher_cfg, "num_threads": 1},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), batch_size=4, num_cpus=1)
    out = {r["segment_id"]: r for r in ds.take_all()}
    for r, ref in zip(rows, _direct(teacher_cfg, rows)):
        got = out[r["segment_id"]]
        assert got["speech_num_frames"] == ref.shape[0]
        np.testing.assert_allclose(np.asarray(got["speech_emb"]).reshape(ref.shape), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_teacher_pool_actors_restart_a_few_times_reserve_their_memory_and_warn_of_nothing_deprecated(ray_cluster):
    """A teacher pool's actors may restart TEACHER_ACTOR_RESTARTS times (none: Ray Data never replaced an
    actor that died idle and the run hung; endless: a death that repeats would loop), with the memory the
    plan reserves; Ray Data's deprecation warning about the extra remote arg that says so is not shown,
    and the stage runs."""
    import warnings

    import ray

    cfg = TeacherConfig(kind="mfcc")
    footprint = TeacherFootprint(weight_bytes=0, frame_rate=50.0, dim=78)
    kw = plan_teacher_pool(cfg, {"CPU": 2, "memory": 8 * GiB}, footprint=footprint).map_batches_kwargs()
    assert kw["max_restarts"] == TEACHER_ACTOR_RESTARTS == 2 and 512 * MiB < kw["memory"] < 8 * GiB
    rows = _segments(LENGTHS[:3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = map_teacher_stage(ray.data.from_items(rows), dict(kw, num_cpus=0.5), teacher=cfg, num_threads=1)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    out = ds.take_all()
    assert sorted(r["segment_id"] for r in out) == [r["segment_id"] for r in rows]
