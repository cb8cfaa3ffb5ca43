"""Verification and retrieval metrics: EER and minDCF against hand-computed cases and two Gaussians
of known separation, balanced seeded trials, recall@k on a constructed case, bootstrap intervals."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import spear.evaluation.verification as verification
from spear.evaluation.verification import (
    bootstrap_stat_ci,
    build_trials,
    cosine_scores,
    det_curve,
    eer,
    evaluate_verification,
    min_dcf,
    retrieval_recall_at_k,
)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_docstring_examples_hold():
    assert doctest.testmod(verification).failed == 0


def test_eer_and_min_dcf_on_hand_computed_cases():
    # targets 0.9 0.8 0.4, non-targets 0.6 0.1. Operating points (t: false alarms, misses):
    # 0.1: 1, 0 | 0.4: 1/2, 0 | 0.6: 1/2, 1/3 | 0.8: 0, 1/3 | 0.9: 0, 2/3 | inf: 0, 1
    scores, labels = [0.9, 0.8, 0.4, 0.6, 0.1], [1, 1, 1, 0, 0]
    fa, miss, thr = det_curve(scores, labels)
    np.testing.assert_allclose(fa, [1, 0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(miss, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert thr[-1] == np.inf
    # the crossing lies between t = 0.6 (miss 1/3 < fa 1/2) and t = 0.8 (miss 1/3 > fa 0): a third of the way
    e, t = eer(scores, labels)
    assert e == pytest.approx(1 / 3) and t == pytest.approx(0.6 + 0.2 / 3)
    # p_target 0.5: cost = (miss + fa) normalised by 0.5 * 1 -> miss + fa; best 1/3 at t = 0.8
    assert min_dcf(scores, labels, p_target=0.5) == (pytest.approx(1 / 3), 0.8)
    # p_target 0.01: misses cost 99x less than false alarms; t = 0.8 still has no false alarm
    assert min_dcf(scores, labels, p_target=0.01) == (pytest.approx(1 / 3), 0.8)
    # c_miss = 10 at p_target 0.5: cost = (10 miss + fa) / 1 -> t = 0.4 (0 misses, 1/2 fa) wins
    assert min_dcf(scores, labels, p_target=0.5, c_miss=10.0) == (pytest.approx(0.5), 0.4)
    # perfectly separated and perfectly inverted scores
    assert eer([3, 2, 1, 0], [1, 1, 0, 0])[0] == 0.0
    assert eer([0, 1, 2, 3], [1, 1, 0, 0])[0] == 1.0
    assert min_dcf([3, 2, 1, 0], [1, 1, 0, 0])[0] == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="both target and non-target"):
        eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        eer([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="finite"):
        min_dcf([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="p_target"):
        min_dcf([0.1, 0.2], [1, 0], p_target=1.0)


@pytest.mark.parametrize("d", [1.0, 2.0, 3.0])
def test_eer_and_min_dcf_of_two_gaussians(d):
    """Targets ~ N(d, 1), non-targets ~ N(0, 1): EER = Phi(-d/2); minDCF = the minimum over t of
    [p Phi(t - d) + (1 - p)(1 - Phi(t))] / p, computed on a fine grid."""
    rng = np.random.default_rng(0)
    n = 20000
    scores = np.r_[rng.normal(d, 1.0, n), rng.normal(0.0, 1.0, n)]
    labels = np.r_[np.ones(n), np.zeros(n)]
    e, t = eer(scores, labels)
    assert e == pytest.approx(_phi(-d / 2), abs=0.006)
    assert t == pytest.approx(d / 2, abs=0.05)  # equal misses and false alarms at the midpoint
    for p in (0.01, 0.05):
        grid = np.linspace(-3, d + 6, 4001)
        analytic = min(p * _phi(x - d) + (1 - p) * (1 - _phi(x)) for x in grid) / p
        assert min_dcf(scores, labels, p)[0] == pytest.approx(analytic, abs=0.04), (d, p)
    # more separation, fewer errors
    assert min_dcf(scores, labels, 0.01)[0] <= 1.0


def test_build_trials_is_balanced_seeded_and_correct():
    rng = np.random.default_rng(3)
    speakers = [f"s{k}" for k in rng.integers(0, 8, 60)]
    t = build_trials(speakers, seed=7)
    spk = np.array(speakers)
    n_target = sum(c * (c - 1) // 2 for c in np.unique(spk, return_counts=True)[1])
    assert int(t.target.sum()) == n_target == int((~t.target).sum())
    assert (spk[t.left[t.target]] == spk[t.right[t.target]]).all()
    assert (spk[t.left[~t.target]] != spk[t.right[~t.target]]).all()
    pairs = set(zip(t.left.tolist(), t.right.tolist()))
    assert len(pairs) == len(t) and all(a < b for a, b in pairs)
    # the same seed gives the same trials, another seed other non-target pairs
    again = build_trials(speakers, seed=7)
    assert np.array_equal(again.left, t.left) and np.array_equal(again.right, t.right)
    other = build_trials(speakers, seed=8)
    assert not np.array_equal(other.left[~other.target], t.left[~t.target])
    capped = build_trials(speakers, max_target=20, seed=0)
    assert int(capped.target.sum()) == 20 == int((~capped.target).sum())
    with pytest.raises(ValueError, match="no target trials"):
        build_trials(["a", "b", "c"])
    with pytest.raises(ValueError, match="single speaker"):
        build_trials(["a", "a", "a"])


def test_verification_of_embeddings_orders_by_speaker_separation():
    rng = np.random.default_rng(0)
    speakers = np.repeat(np.arange(10), 6)
    centres = rng.normal(size=(10, 32))
    trials = build_trials(speakers, seed=0)
    results = []
    for noise in (0.3, 1.5, 100.0):
        emb = centres[speakers] + noise * rng.normal(size=(60, 32))
        results.append(evaluate_verification(emb, trials, n_bootstrap=200))
    tight, loose, noise_only = results
    assert tight.eer < 0.02 < loose.eer < noise_only.eer
    assert abs(noise_only.eer - 0.5) < 0.12  # embeddings of pure noise: chance
    for r in results:
        assert r.eer_ci[0] <= r.eer <= r.eer_ci[1]
        for p in (0.01, 0.05):
            assert r.min_dcf_ci[p][0] <= r.min_dcf[p] <= r.min_dcf_ci[p][1]
        assert r.num_target == r.num_nontarget == 150
        assert len(r.det_fa) == len(r.det_miss)
    # cosine scoring ignores the embeddings' norms
    emb = centres[speakers] + 0.3 * rng.normal(size=(60, 32))
    scaled = emb * rng.uniform(0.1, 10.0, size=(60, 1))
    np.testing.assert_allclose(cosine_scores(emb, trials.left, trials.right),
                               cosine_scores(scaled, trials.left, trials.right))


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_data():
    """Over independent samples the 95 % interval holds the true EER about 95 % of the time; ten
    times the trials give an interval about sqrt(10) times narrower."""
    rng = np.random.default_rng(1)

    def interval(n: int) -> tuple[float, float]:
        scores = np.r_[rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)]
        labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        return bootstrap_stat_ci(lambda idx: eer(scores[idx], labels[idx])[0], 2 * n, n_resamples=200,
                                 seed=int(rng.integers(1 << 30)))

    small = [interval(150) for _ in range(40)]
    coverage = np.mean([lo <= _phi(-1.0) <= hi for lo, hi in small])
    assert 0.8 <= coverage <= 1.0, coverage
    wide = np.mean([hi - lo for lo, hi in small])
    narrow = np.mean([hi - lo for lo, hi in (interval(1500) for _ in range(3))])
    assert 0.2 < narrow / wide < 0.5, (narrow, wide)


def test_retrieval_recall_on_a_constructed_case():
    # queries: sentences a, b, c, d (and e, absent from the gallery); gallery: the same sentences in
    # "another language", shuffled, plus a distractor "z" identical to query d, so d's right answer
    # comes second.
    eye = np.eye(6)
    queries = np.stack([eye[0], eye[1], eye[2], eye[3], eye[5]])
    qids = ["a", "b", "c", "d", "e"]
    gallery = np.stack([eye[2] + 0.1 * eye[4], eye[3], eye[0] + 0.2 * eye[1], eye[1], 0.5 * eye[3] + eye[4]])
    gids = ["c", "z", "a", "b", "d"]
    res = retrieval_recall_at_k(queries, gallery, qids, gids, ks=(1, 2, 5), n_bootstrap=100)
    assert res.num_queries == 4 and res.unmatched == 1
    assert res.recall == {1: 0.75, 2: 1.0, 5: 1.0}
    assert res.hits[1].tolist() == [True, True, True, False, False]
    assert res.similarity.shape == (5, 5)
    assert res.similarity[3, 1] == pytest.approx(1.0)
    lo, hi = res.recall_ci[1]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    # translations of one sentence: two gallery items with one id; either counts
    res2 = retrieval_recall_at_k(queries[:1], np.stack([eye[1], eye[0]]), ["a"], ["a", "a"], ks=(1,))
    assert res2.recall[1] == 1.0
    as_dict = res.as_dict()
    assert as_dict["recall"]["R@1"] == 0.75 and as_dict["unmatched"] == 1


def test_retrieval_recall_of_random_embeddings_is_near_chance():
    rng = np.random.default_rng(0)
    n = 200
    q, g = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    ids = np.arange(n)
    res = retrieval_recall_at_k(q, g, ids, ids, ks=(1, 5), n_bootstrap=200)
    assert res.recall[1] < 0.04 and res.recall[5] < 0.08  # chance: 1/200 and 5/200
    aligned = retrieval_recall_at_k(g + 0.1 * rng.normal(size=(n, 16)), g, ids, ids, ks=(1,), n_bootstrap=200)
    assert aligned.recall[1] > 0.95
