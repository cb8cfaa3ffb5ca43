"""Probe results: one row per task and layer, and each model's best layer per task."""

from __future__ import annotations

import numpy as np

from spear.evaluation.features import Features
from spear.evaluation.results import best_layers, probe_model
from spear.evaluation.probes import run_probe
from spear.evaluation.tasks import Task, task_arrays


def test_layer_is_chosen_by_validation_then_lower_validation_loss_then_first():
    def row(k, score, val, loss):
        return {"task": "t", "model": "student", "layer": k, "score": score, "ci": [score - 0.1, score],
                "val_score": val, "val_loss": loss, "l2": [0.01]}

    rows = [row(1, 0.9, 0.5, 0.7), row(2, 0.6, 0.8, 0.4), row(3, 0.95, 0.8, 0.5), row(4, 0.7, 0.8, 0.4)]
    rows.append({"task": "t", "model": "fbank", "layer": None, "score": 0.4, "ci": [0.3, 0.5], "val_score": None,
                 "val_loss": None, "l2": [1.0]})
    assert best_layers(rows) == {"t": {"student": {"layer": 2, "score": 0.6, "ci": [0.5, 0.6], "val_score": 0.8,
                                                   "l2": [0.01]},
                                       "fbank": {"layer": None, "score": 0.4, "ci": [0.3, 0.5], "val_score": None,
                                                 "l2": [1.0]}}}


def _two_layer_case(seed: int = 0):
    """Real arrays where the best test layer is not the best validation layer.

    Layer 1 separates the training items cleanly (validation ~1.0) but its test features are
    flipped (test 0.0); layer 2 is weak on training items (validation ~0.7) but clean on test
    items (test 1.0)."""
    rng = np.random.default_rng(seed)
    n_train, n_test = 80, 30
    labels = ["a" if k % 2 else "b" for k in range(n_train + n_test)]
    sign = np.array([1.0 if lab == "a" else -1.0 for lab in labels])
    tr = np.arange(n_train + n_test) < n_train
    layer1 = np.where(tr, sign, -sign) + 0.05 * rng.normal(size=len(sign))
    layer2 = np.where(tr, 0.5 * sign + rng.normal(size=len(sign)), sign + 0.01 * rng.normal(size=len(sign)))
    feats = Features(pooled=[layer1[:, None].astype(np.float32), layer2[:, None].astype(np.float32)], frames=[{}, {}])
    task = Task("ab", "utterance", "test", "a or b", list(range(len(labels))),
                ["train" if t else "test" for t in tr], labels=labels)
    return feats, task


def test_a_model_is_reported_at_its_validation_layer_not_its_best_test_layer():
    feats, task = _two_layer_case()
    rows = probe_model("student", feats, [1, 2], [task], {}, seeds=(0, 1, 2), l2_grid=(1e-3, 1e-1))
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer[2]["score"] > by_layer[1]["score"]  # on test, layer 2 wins...
    assert by_layer[1]["val_score"] > by_layer[2]["val_score"]  # ...on validation, layer 1
    best = best_layers(rows)["ab"]["student"]
    assert best["layer"] == 1
    assert best["score"] == by_layer[1]["score"] and best["ci"] == by_layer[1]["ci"]
    assert best["l2"] == by_layer[1]["l2"] and best["val_score"] == by_layer[1]["val_score"]


def test_validation_never_uses_test_items():
    """Whatever the test items hold, the validation scores, the chosen L2 and the chosen layer
    stay the same; the validation carve covers training items only (whole clips for frame tasks)."""
    feats, task = _two_layer_case()
    rows = probe_model("m", feats, [1, 2], [task], {}, seeds=(0, 1), l2_grid=(1e-3, 1e-1))
    rng = np.random.default_rng(5)
    test_idx = [i for i, s in zip(task.items, task.splits) if s == "test"]
    poisoned = Features(pooled=[p.copy() for p in feats.pooled], frames=[{}, {}])
    for p in poisoned.pooled:
        p[test_idx] = rng.normal(scale=10.0, size=(len(test_idx), p.shape[1]))
    relabelled = Task(task.name, task.level, task.source, task.description, task.items, task.splits,
                      labels=[lab if s == "train" else "a" for lab, s in zip(task.labels, task.splits)])
    rows2 = probe_model("m", poisoned, [1, 2], [relabelled], {}, seeds=(0, 1), l2_grid=(1e-3, 1e-1))
    for r, r2 in zip(rows, rows2):
        assert (r["val_seed_scores"], r["val_seed_losses"], r["l2"]) == (r2["val_seed_scores"], r2["val_seed_losses"],
                                                                         r2["l2"])
    assert best_layers(rows)["ab"]["m"]["layer"] == best_layers(rows2)["ab"]["m"]["layer"]
    assert [r["score"] for r in rows] != [r["score"] for r in rows2]  # the poison did reach the test scores

    # frame task: every validation frame belongs to a training clip, never to a test clip
    grids = {i: np.arange(8) * 0.25 + 0.125 for i in range(12)}
    frames = {i: rng.normal(size=(8, 3)) for i in range(12)}
    ftask = Task("f", "frame", "test", "on or off", list(range(12)), ["train"] * 9 + ["test"] * 3,
                 intervals=[[(0.0, 1.0)] if i % 2 else [(1.0, 2.0)] for i in range(12)])
    xtr, ytr, xte, yte, gtr, gte = task_arrays(ftask, np.zeros((12, 3)), frames, grids)
    res = run_probe(xtr, ytr, xte, yte, seeds=(0, 1, 2), l2_grid=(1e-2, 1.0), groups_train=gtr, groups_test=gte)
    for mask in res.val_masks:
        assert len(mask) == len(xtr) and mask.any()
        val_clips = set(gtr[mask].tolist())
        assert val_clips <= set(range(9)) and not val_clips & set(gte.tolist())
        assert not val_clips & set(gtr[~mask].tolist())  # whole clips
    assert all(v is not None for v in res.val_seed_scores)


def test_probe_model_rows():
    rng = np.random.default_rng(0)
    n = 60
    labels = ["a" if k % 2 else "b" for k in range(n)]
    informative = np.array([[1.0 if lab == "a" else -1.0] for lab in labels]) + 0.1 * rng.normal(size=(n, 1))
    noise = rng.normal(size=(n, 3))
    feats = Features(pooled=[noise.astype(np.float32), informative.astype(np.float32)], frames=[{}, {}])
    task = Task("ab", "utterance", "test", "a or b", list(range(n)), ["train"] * 40 + ["test"] * 20, labels=labels)
    rows = probe_model("student", feats, [1, 2], [task], {}, seeds=(0,), l2_grid=(1e-2,))
    assert [(r["task"], r["model"], r["layer"], r["level"]) for r in rows] == [
        ("ab", "student", 1, "utterance"), ("ab", "student", 2, "utterance")]
    assert rows[1]["score"] == 1.0 and rows[1]["num_train"] == 40 and rows[1]["num_test"] == 20
    assert best_layers(rows)["ab"]["student"]["layer"] == 2
