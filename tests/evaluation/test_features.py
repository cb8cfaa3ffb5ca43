"""Feature extraction: layer choice, teacher names, the model loaders' order, and extraction that
does not depend on how clips are batched (pooled means and grid frames checked against fbank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear.config import TeacherConfig
from spear.evaluation.clips import Clip
from spear.evaluation.features import (
    FBANK_BINS,
    RANDOM_STUDENT_SEED,
    ProbedModels,
    extract,
    extractor_loaders,
    fbank_extractor,
    random_student,
    select_layers,
    teacher_names,
)
from spear.evaluation.tasks import frame_grid
from spear.models.frontend import KaldiFbank


def test_select_layers():
    assert select_layers(4, "all") == [1, 2, 3, 4]
    assert select_layers(4, "last") == [4]
    assert select_layers(4, [3, 1, 3]) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(4, [0, 2])
    with pytest.raises(ValueError, match="out of range"):
        select_layers(4, [])


def test_teacher_names_are_unique():
    cfgs = [TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank"), TeacherConfig(kind="mfcc")]
    assert teacher_names(cfgs) == ["teacher:mfcc", "teacher:fbank", "teacher:mfcc#2"]


def test_loaders_in_probing_order_and_settings_checked():
    models = ProbedModels(random_student={"architecture": "transformer", "size": "tiny"},
                          teachers=[TeacherConfig(kind="mfcc"), {"kind": "fbank"}])
    names = [name for name, _ in extractor_loaders(models, storage=None, device=torch.device("cpu"))]
    assert names == ["random_student", "teacher:mfcc", "teacher:fbank", "fbank"]
    assert [n for n, _ in extractor_loaders(ProbedModels(random_student=False, fbank_floor=False), None,
                                            torch.device("cpu"))] == []
    with pytest.raises(ValueError, match="needs student_dir"):
        ProbedModels()


def _clips(seconds: list[float]) -> dict[int, Clip]:
    rng = np.random.default_rng(0)
    return {i: Clip((rng.normal(size=int(s * 16000)) * 3000).astype(np.int16), "wav", 16000, 1)
            for i, s in enumerate(seconds)}


def test_extraction_does_not_depend_on_batching():
    clips = _clips([0.6, 1.3, 0.9, 2.0, 0.3])
    grids = {i: frame_grid(clips[i].seconds) for i in (1, 3)}  # two clips serve a frame task
    cpu = torch.device("cpu")
    one_each = extract(fbank_extractor(cpu), clips, grids, num_items=6, device=cpu, batch_seconds=0.1)
    together = extract(fbank_extractor(cpu), clips, grids, num_items=6, device=cpu, batch_seconds=60.0)
    fbank = KaldiFbank(num_mel_bins=FBANK_BINS)
    for i, clip in clips.items():
        wav = torch.from_numpy(clip.pcm.astype(np.float32) / 32768.0)[None]
        feats, nf = fbank(wav, torch.tensor([wav.shape[1]]))
        ref = feats[0, : int(nf[0])].mean(0).numpy()
        np.testing.assert_allclose(one_each.pooled[0][i], ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(together.pooled[0][i], ref, rtol=1e-4, atol=1e-4)
        if i in grids:
            idx = np.floor(grids[i] * 100.0).astype(np.int64)
            np.testing.assert_allclose(together.frames[0][i], feats[0, idx].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(one_each.frames[0][i], together.frames[0][i], rtol=1e-4, atol=1e-4)
    assert not one_each.pooled[0][5].any()  # an item without a clip stays zero
    assert set(together.frames[0]) == {1, 3}


def test_released_models_load_after_the_students_with_unique_names():
    from spear.evaluation.features import released_names

    models = ProbedModels(random_student=False, fbank_floor=False, released=["a/spear.pt", "b/spear.pt", "s3://m/base/"])
    names = [name for name, _ in extractor_loaders(models, storage=None, device=torch.device("cpu"))]
    assert names == ["released:spear.pt", "released:spear.pt#2", "released:base"]
    assert released_names([]) == []


@pytest.mark.parametrize("size", ["tiny", "mini"])
def test_the_random_student_is_the_trained_students_start_at_the_default_seed(size):
    """With train.seed at its default, training starts from exactly the random student's weights, so the
    report's student - random_student margin is what training added (and 0 where it added nothing)."""
    from types import SimpleNamespace

    from spear.config import TrainConfig
    from spear.stages.train_loop import build_objective

    cfg = TrainConfig.model_validate({"student": {"size": size}})
    assert cfg.seed == RANDOM_STUDENT_SEED
    plan = SimpleNamespace(roles=("speech", "audio"), codebooks={"speech": 4, "audio": 4},
                           frame_rates={"speech": 50.0, "audio": 25.0})
    torch.manual_seed(cfg.seed)  # as train_loop_per_worker does before building
    trained_start = build_objective(cfg, plan).encoder.state_dict()
    random = random_student({"architecture": cfg.student.architecture, "size": size},
                            torch.device("cpu")).encoder.state_dict()
    assert trained_start.keys() == random.keys()
    assert all(torch.equal(v, random[k]) for k, v in trained_start.items())
    torch.manual_seed(cfg.seed + 1)
    other = build_objective(cfg, plan).encoder.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in trained_start.items())


def test_teachers_side_by_side_concatenate_pooled_rows_and_grid_frames():
    from spear.evaluation.features import Features, combine_features, combined_teachers_name

    rng = np.random.default_rng(0)
    a = Features([rng.normal(size=(5, 3)).astype(np.float32)], [{1: rng.normal(size=(4, 3)).astype(np.float32)}])
    b = Features([rng.normal(size=(5, 2)).astype(np.float32)], [{1: rng.normal(size=(4, 2)).astype(np.float32)}])
    both = combine_features([a, b])
    assert np.array_equal(both.pooled[0][:, :3], a.pooled[0]) and np.array_equal(both.pooled[0][:, 3:], b.pooled[0])
    assert np.array_equal(both.frames[0][1], np.concatenate([a.frames[0][1], b.frames[0][1]], 1))
    assert combined_teachers_name(["teacher:mfcc", "teacher:fbank"]) == "teachers:mfcc+fbank"
    with pytest.raises(ValueError, match="different items"):
        combine_features([a, Features(b.pooled, [{2: b.frames[0][1]}])])
    with pytest.raises(ValueError, match="single-layer"):
        combine_features([a, Features(b.pooled * 2, b.frames * 2)])
