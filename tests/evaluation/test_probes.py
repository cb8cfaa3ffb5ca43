"""Linear probes: a separable problem, permuted labels, determinism per seed, unseen test
labels, and groups kept whole by the validation carve and the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from spear.evaluation.probes import bootstrap_ci, fit_probe, macro_f1, run_probe, validation_carve


def _blobs(n: int, dim: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    y = rng.integers(0, classes, n)
    return centres[y] + rng.normal(size=(n, dim)), np.array([f"c{v}" for v in y])


def test_probe_fits_a_separable_problem():
    x, y = _blobs(400, 16, 4, spread=4.0, seed=0)
    res = run_probe(x[:250], y[:250], x[250:], y[250:], seeds=(0, 1, 2))
    assert res.score >= 0.98
    assert res.ci[0] <= res.score <= res.ci[1] <= 1.0
    assert res.macro_f1 >= 0.98
    assert (res.num_train, res.num_test, res.num_classes) == (250, 150, 4)
    assert len(res.seed_scores) == 3 and len(res.l2) == 3
    assert 0.0 < res.chance < 0.5  # majority class of 4 roughly balanced ones
    assert set(res.test_predictions[0]) <= set(y)


def test_probe_on_permuted_labels_is_near_chance():
    x, y = _blobs(800, 16, 4, spread=4.0, seed=1)
    y_perm = np.random.default_rng(5).permutation(y)
    res = run_probe(x[:400], y_perm[:400], x[400:], y_perm[400:], seeds=(0, 1))
    assert abs(res.score - 0.25) < 0.1, res.score
    # the same features with the true labels are decodable: the probe, not the data, is at chance
    assert run_probe(x[:400], y[:400], x[400:], y[400:], seeds=(0,)).score > 0.95


def test_probe_is_deterministic_per_seed():
    x, y = _blobs(300, 12, 3, spread=0.8, seed=2)  # overlapping classes: the L2 choice matters
    a = run_probe(x[:200], y[:200], x[200:], y[200:], seeds=(0, 1, 2))
    b = run_probe(x[:200], y[:200], x[200:], y[200:], seeds=(0, 1, 2))
    assert a.to_dict() == b.to_dict()
    # one seed's probe does not depend on the other seeds of the call
    for k, s in enumerate((0, 1, 2)):
        alone = run_probe(x[:200], y[:200], x[200:], y[200:], seeds=(s,))
        assert alone.seed_scores == [a.seed_scores[k]] and alone.l2 == [a.l2[k]]
        assert np.array_equal(alone.test_predictions[0], a.test_predictions[k])
    # different seeds carve different validation sets
    ids = np.unique(y[:200], return_inverse=True)[1]
    assert not np.array_equal(validation_carve(ids, 0), validation_carve(ids, 1))


def test_unseen_test_labels_count_as_errors():
    x = np.array([[0.0], [0.1], [3.0], [3.1], [0.05], [5.0]])
    y = np.array(["a", "a", "b", "b", "a", "z"])
    res = run_probe(x[:4], y[:4], x[4:], y[4:], seeds=(0,))
    assert res.score == pytest.approx(0.5)  # "a" right, "z" (never trained on) wrong
    assert res.test_predictions[0][0] == "a"
    p = fit_probe(x[:4], y[:4], l2=1e-3)
    assert p.predict(np.array([[0.0], [3.0]])).tolist() == ["a", "b"]


def test_grouped_validation_and_bootstrap_keep_groups_whole():
    y = np.repeat([0, 1], 50)
    groups = np.arange(100) // 10
    for seed in range(4):
        val = validation_carve(y, seed, 0.2, groups)
        for g in np.unique(groups):
            assert len(set(val[groups == g])) == 1  # a group is all-validation or all-train
        assert val.sum() == 20
    # a perfectly consistent group structure gives a degenerate interval; mixed values do not
    assert bootstrap_ci(np.ones(30), np.arange(30) // 3) == (1.0, 1.0)
    lo, hi = bootstrap_ci(np.r_[np.ones(15), np.zeros(15)], np.arange(30) // 3)
    assert 0.0 < lo < 0.5 < hi < 1.0
    assert np.isnan(bootstrap_ci(np.ones(30), n_resamples=0)).all()  # no interval asked for: none, not an IndexError
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])) == 1.0
