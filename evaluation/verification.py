"""Utterance-embedding metrics: speaker verification (EER, minDCF, DET) and cross-lingual retrieval.

**Verification.** A trial pairs two utterances; it is a *target* trial when both have the same
speaker. Trials are built from held-out speakers (:func:`build_trials`: every or a sample of the
target pairs, as many non-target pairs, seeded) and scored by the cosine of the two embeddings
(:func:`cosine_scores`). A threshold t accepts scores >= t; at t the miss rate is the share of
target trials below t and the false-alarm rate the share of non-target trials at or above it.

- :func:`eer`: the equal error rate, where miss and false-alarm rates cross (linear interpolation
  between the two operating points around the crossing), and its threshold;
- :func:`min_dcf`: NIST SRE's normalised minimum detection cost,
  ``min_t [c_miss p_target P_miss(t) + c_fa (1 - p_target) P_fa(t)] / min(c_miss p_target, c_fa (1 - p_target))``,
  with ``c_miss = c_fa = 1`` and ``p_target`` 0.01 (SRE'08-style, VoxSRC) or 0.05 (VoxSRC 2021+);
  1.0 is the cost of always rejecting;
- :func:`det_curve`: every operating point (false-alarm rate, miss rate, threshold) for a DET plot.

**Retrieval.** :func:`retrieval_recall_at_k`: each query (speech in one language) ranks the gallery
(speech or text of the same sentences in another language) by cosine; recall@k is the share of
queries with a gallery item of the same sentence id among the top k.

**Confidence intervals** follow :mod:`spear.evaluation.probes`: 95 % percentile bootstrap, 1000
resamples, a fixed seed. Recall is a mean over queries, so its interval is
:func:`~spear.evaluation.probes.bootstrap_ci` of the per-query hits (grouped by sentence when asked);
EER and minDCF are not means, so :func:`bootstrap_stat_ci` resamples trials the same way and
recomputes them.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(6, 16))
    >>> speakers = np.repeat(np.arange(6), 5)
    >>> emb = centres[speakers] + 0.3 * rng.normal(size=(30, 16))
    >>> trials = build_trials(speakers, seed=0)
    >>> res = evaluate_verification(emb, trials, n_bootstrap=100)
    >>> res.num_target == res.num_nontarget == 60, res.eer < 0.05, res.eer_ci[0] <= res.eer <= res.eer_ci[1]
    (True, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from spear.evaluation.probes import bootstrap_ci

#: The target priors minDCF is reported at (NIST SRE / VoxSRC conventions, c_miss = c_fa = 1).
P_TARGETS = (0.01, 0.05)


# ----------------------------------------------------------------------------- scores


def _unit(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected embeddings [N, D], got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_matrix(a: Any, b: Any) -> np.ndarray:
    """Cosine similarities [N, M] between the rows of ``a`` [N, D] and ``b`` [M, D]."""
    return _unit(a) @ _unit(b).T


def cosine_scores(embeddings: Any, left: Any, right: Any) -> np.ndarray:
    """The cosine of ``embeddings[left[i]]`` and ``embeddings[right[i]]`` for every trial i.

    >>> cosine_scores(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), [0, 0], [1, 2]).tolist()
    [0.0, 1.0]
    """
    e = _unit(embeddings)
    return np.einsum("nd,nd->n", e[np.asarray(left)], e[np.asarray(right)])


# ----------------------------------------------------------------------------- trials


@dataclass
class Trials:
    """Verification trials over utterances 0 .. N-1: ``left``, ``right`` [K] utterance indexes and
    ``target`` [K] bool (same speaker)."""

    left: np.ndarray
    right: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)


def build_trials(speakers: Sequence[Any], max_target: Optional[int] = None, seed: int = 0) -> Trials:
    """Balanced trials from the speaker labels of held-out utterances.

    Target trials: every pair of utterances of one speaker (a seeded sample of ``max_target`` of them
    when there are more); non-target trials: as many distinct pairs of utterances of different
    speakers, drawn uniformly with ``seed``. Speakers with one utterance only join non-target trials.
    Raises ValueError when no target or no non-target trial can be made.

    >>> t = build_trials(["a", "a", "b", "b", "c"], seed=0)
    >>> len(t), int(t.target.sum()), sorted(zip(t.left[t.target].tolist(), t.right[t.target].tolist()))
    (4, 2, [(0, 1), (2, 3)])
    """
    spk = np.asarray(speakers, dtype=object)
    n = len(spk)
    _, ids = np.unique(spk.astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    i, j = np.triu_indices(n, k=1)
    same = ids[i] == ids[j]
    ti, tj = i[same], j[same]
    if len(ti) == 0:
        raise ValueError(f"no target trials: no held-out speaker has two utterances ({n} utterances, "
                         f"{ids.max() + 1 if n else 0} speakers)")
    if max_target is not None and len(ti) > max_target:
        keep = np.sort(rng.choice(len(ti), size=max_target, replace=False))
        ti, tj = ti[keep], tj[keep]
    ni, nj = i[~same], j[~same]
    if len(ni) == 0:
        raise ValueError("no non-target trials: the held-out utterances have a single speaker")
    keep = np.sort(rng.choice(len(ni), size=min(len(ti), len(ni)), replace=False))
    left = np.concatenate([ti, ni[keep]])
    right = np.concatenate([tj, nj[keep]])
    target = np.concatenate([np.ones(len(ti), bool), np.zeros(len(keep), bool)])
    return Trials(left, right, target)


# ----------------------------------------------------------------------------- detection metrics


def _check(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if y.all() or not y.any():
        raise ValueError(f"need both target and non-target trials, got {int(y.sum())} target of {len(y)}")
    return s, y


def det_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every operating point: (false-alarm rates, miss rates, thresholds), thresholds rising.

    Threshold k accepts scores >= thresholds[k]; the first threshold is the lowest score (accept
    all: false alarms 1, misses 0), the last is +inf (reject all: false alarms 0, misses 1).

    >>> fa, miss, thr = det_curve([0.9, 0.8, 0.3, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0, 0])
    >>> fa.round(3).tolist(), miss.round(3).tolist()
    ([1.0, 0.667, 0.333, 0.333, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.333, 0.333, 0.667, 1.0])
    """
    s, y = _check(scores, labels)
    thresholds = np.unique(s)
    order = np.sort(s[y]), np.sort(s[~y])
    # misses: targets strictly below t; false alarms: non-targets at or above t
    miss = np.searchsorted(order[0], thresholds, side="left") / len(order[0])
    fa = 1.0 - np.searchsorted(order[1], thresholds, side="left") / len(order[1])
    return np.r_[fa, 0.0], np.r_[miss, 1.0], np.r_[thresholds, np.inf]


def eer(scores: Any, labels: Any) -> tuple[float, float]:
    """(equal error rate, its threshold): where the miss and false-alarm rates cross, linearly
    interpolated between the operating points on both sides of the crossing.

    >>> eer([0.9, 0.8, 0.3, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0, 0])     # at t = 0.7: 1 miss, 1 false alarm
    (0.3333333333333333, 0.7)
    >>> eer([0.9, 0.8, 0.6, 0.5], [1, 1, 0, 0])[0]                 # separable
    0.0
    """
    fa, miss, thr = det_curve(scores, labels)
    k = int(np.argmax(miss >= fa))  # miss rises, false alarms fall: the first point past the crossing
    if miss[k] == fa[k] or k == 0:
        return float(miss[k]), float(thr[k])
    d_miss, d_fa = miss[k] - miss[k - 1], fa[k] - fa[k - 1]
    a = (fa[k - 1] - miss[k - 1]) / (d_miss - d_fa)
    hi = thr[k] if np.isfinite(thr[k]) else thr[k - 1]
    return float(miss[k - 1] + a * d_miss), float(thr[k - 1] + a * (hi - thr[k - 1]))


def min_dcf(scores: Any, labels: Any, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
            ) -> tuple[float, float]:
    """(normalised minimum detection cost, the threshold that reaches it); see the module docstring.

    >>> scores, labels = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0, 0]
    >>> round(min_dcf(scores, labels, p_target=0.5)[0], 4)   # best: (1/3 miss + 0 fa) / 1 at t = 0.8
    0.3333
    >>> round(min_dcf(scores, labels, p_target=0.01)[0], 4)   # the same point: no false alarm there
    0.3333
    >>> min_dcf([0.5, 0.4, 0.9, 0.1], [1, 1, 0, 0], p_target=0.01)   # a non-target on top: reject all
    (1.0, inf)
    """
    if not 0 < p_target < 1 or c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"need 0 < p_target < 1 and positive costs, got {p_target}, {c_miss}, {c_fa}")
    fa, miss, thr = det_curve(scores, labels)
    cost = c_miss * p_target * miss + c_fa * (1 - p_target) * fa
    k = int(np.argmin(cost))
    return float(cost[k] / min(c_miss * p_target, c_fa * (1 - p_target))), float(thr[k])


def bootstrap_stat_ci(stat: Callable[[np.ndarray], float], n: int, groups: Optional[np.ndarray] = None,
                      n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(indexes)``, resampling ``n`` items (or whole ``groups``)
    with replacement: :func:`spear.evaluation.probes.bootstrap_ci`'s conventions for a statistic that
    is not a mean (EER, minDCF). Resamples where ``stat`` raises ValueError (e.g. no target trial
    drawn) are skipped.

    >>> x = np.arange(100.0)
    >>> lo, hi = bootstrap_stat_ci(lambda idx: float(np.median(x[idx])), 100)
    >>> lo < 49.5 < hi
    True
    """
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if groups is not None:
        uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    values = []
    for _ in range(n_resamples):
        if groups is None:
            idx = rng.integers(0, n, size=n)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])
        try:
            values.append(stat(idx))
        except ValueError:
            continue
    if not values:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


@dataclass
class VerificationResult:
    """EER (and threshold), minDCF per target prior, their 95 % bootstrap intervals over trials,
    trial counts, and the DET curve (false-alarm rates, miss rates) for a plot."""

    eer: float
    eer_threshold: float
    eer_ci: tuple[float, float]
    min_dcf: dict[float, float]
    min_dcf_ci: dict[float, tuple[float, float]]
    num_target: int
    num_nontarget: int
    det_fa: np.ndarray = field(repr=False)
    det_miss: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (no curve)."""
        return {"eer": self.eer, "eer_threshold": self.eer_threshold, "eer_ci": list(self.eer_ci),
                "min_dcf": {str(p): v for p, v in self.min_dcf.items()},
                "min_dcf_ci": {str(p): list(v) for p, v in self.min_dcf_ci.items()},
                "num_target": self.num_target, "num_nontarget": self.num_nontarget}


def evaluate_verification(embeddings: Any, trials: Trials, p_targets: Sequence[float] = P_TARGETS,
                          n_bootstrap: int = 1000, seed: int = 0) -> VerificationResult:
    """Cosine-score ``trials`` over ``embeddings`` [N, D] and measure EER, minDCF and the DET curve."""
    scores = cosine_scores(embeddings, trials.left, trials.right)
    y = trials.target
    e, thr = eer(scores, y)
    dcf = {float(p): min_dcf(scores, y, p)[0] for p in p_targets}
    eer_ci = bootstrap_stat_ci(lambda idx: eer(scores[idx], y[idx])[0], len(y), n_resamples=n_bootstrap, seed=seed)
    dcf_ci = {float(p): bootstrap_stat_ci(lambda idx, p=p: min_dcf(scores[idx], y[idx], p)[0], len(y),
                                          n_resamples=n_bootstrap, seed=seed) for p in p_targets}
    fa, miss, _ = det_curve(scores, y)
    return VerificationResult(e, thr, eer_ci, dcf, dcf_ci, int(y.sum()), int((~y).sum()), fa, miss)


# ----------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalResult:
    """``recall``: k -> recall@k over the queries that have a match in the gallery; ``recall_ci``: k ->
    95 % bootstrap interval; ``hits``: k -> per-query bool [Q] (False for unmatched queries);
    ``similarity`` [Q, G]: the cosine matrix (for a plot); ``num_queries`` scored and ``unmatched``:
    queries whose id is not in the gallery (left out of the recall)."""

    recall: dict[int, float]
    recall_ci: dict[int, tuple[float, float]]
    hits: dict[int, np.ndarray] = field(repr=False)
    similarity: np.ndarray = field(repr=False)
    num_queries: int = 0
    unmatched: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"recall": {f"R@{k}": v for k, v in self.recall.items()},
                "recall_ci": {f"R@{k}": list(v) for k, v in self.recall_ci.items()},
                "num_queries": self.num_queries, "unmatched": self.unmatched}


def retrieval_recall_at_k(queries: Any, gallery: Any, query_ids: Sequence[Any], gallery_ids: Sequence[Any],
                          ks: Sequence[int] = (1, 5), n_bootstrap: int = 1000, seed: int = 0,
                          group_ci_by_id: bool = False) -> RetrievalResult:
    """Recall@k of ``queries`` [Q, D] against ``gallery`` [G, D] by cosine; the right answers of a
    query are the gallery items with its id (e.g. the same sentence in another language). Ties rank
    the gallery's earlier items first. ``group_ci_by_id`` resamples sentence ids instead of queries
    for the intervals (several queries per sentence are not independent).

    >>> q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> g = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.9]])
    >>> r = retrieval_recall_at_k(q, g, ["a", "b", "c"], ["b", "a", "c"], ks=(1, 2), n_bootstrap=10)
    >>> r.recall, r.hits[1].tolist()
    ({1: 1.0, 2: 1.0}, [True, True, True])
    """
    qids, gids = np.asarray(query_ids).astype(str), np.asarray(gallery_ids).astype(str)
    sim = cosine_matrix(queries, gallery)
    if sim.shape != (len(qids), len(gids)):
        raise ValueError(f"{sim.shape[0]} queries / {sim.shape[1]} gallery items but {len(qids)} / {len(gids)} ids")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")
    relevant = qids[:, None] == gids[None, :]
    matched = relevant.any(axis=1)
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked_relevant = np.take_along_axis(relevant, order, axis=1)
    first = np.where(matched, ranked_relevant.argmax(axis=1), len(gids))  # rank of the first right answer
    recall, ci, hits = {}, {}, {}
    groups = qids[matched] if group_ci_by_id else None
    for k in ks:
        h = first < int(k)
        hits[int(k)] = h
        recall[int(k)] = float(h[matched].mean()) if matched.any() else float("nan")
        ci[int(k)] = bootstrap_ci(h[matched].astype(float), groups, n_resamples=n_bootstrap, seed=seed)
    return RetrievalResult(recall, ci, hits, sim, int(matched.sum()), int((~matched).sum()))
