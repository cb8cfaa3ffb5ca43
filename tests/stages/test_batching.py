"""Length-budget batching: the padded size of every batch stays within the budget, in the
caller's order, and both orders in use (longest first, shortest first) cut as documented."""

from __future__ import annotations

import numpy as np

from spear.stages.batching import plan_subbatches


def test_every_batch_fits_the_budget_and_every_item_runs_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(0, 5000, int(rng.integers(0, 30)))
        budget = int(rng.integers(1, 20000))
        for order in (None, np.argsort(lengths, kind="stable")):
            batches = plan_subbatches(lengths, budget, order=order)
            flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
            expected = np.argsort(-lengths, kind="stable") if order is None else order
            assert flat.tolist() == list(expected)  # consecutive runs of the order
            for b in batches:
                cost = len(b) * max(int(lengths[b].max()), 1)
                assert cost <= budget or len(b) == 1  # only a single too-long item exceeds it
            # greedy: the next batch's first item would not have fitted into the previous batch
            for a, b in zip(batches, batches[1:]):
                longest = max(max(int(lengths[a].max()), 1), max(int(lengths[b[0]]), 1))
                assert longest * (len(a) + 1) > budget


def test_shortest_first_order_and_zero_lengths():
    lengths = np.array([0, 300, 100, 0, 200])
    order = np.argsort(lengths, kind="stable")  # 0, 3, 2, 4, 1
    assert [b.tolist() for b in plan_subbatches(lengths, 400, order=order)] == [[0, 3, 2], [4], [1]]
    assert plan_subbatches(np.zeros(0, np.int64), 100) == []
    assert [b.tolist() for b in plan_subbatches([5, 5], 1)] == [[0], [1]]  # too long: one each
