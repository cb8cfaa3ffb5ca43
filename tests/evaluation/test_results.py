"""Probe results: one row per task and layer, and each model's best layer per task."""

from __future__ import annotations

import numpy as np

from spear.evaluation.features import Features
from spear.evaluation.results import best_layers, probe_model
from spear.evaluation.tasks import Task


def test_best_layer_is_the_highest_score_first_on_ties():
    rows = [{"task": "t", "model": "student", "layer": k, "score": s, "ci": [lo, s]}
            for k, s, lo in ((1, 0.5, 0.4), (2, 0.8, 0.7), (3, 0.8, 0.6), (4, 0.6, 0.5))]
    rows.append({"task": "t", "model": "fbank", "layer": None, "score": 0.4, "ci": [0.3, 0.5]})
    assert best_layers(rows) == {"t": {"student": {"layer": 2, "score": 0.8, "ci": [0.7, 0.8]},
                                       "fbank": {"layer": None, "score": 0.4, "ci": [0.3, 0.5]}}}


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
