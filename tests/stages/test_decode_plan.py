"""Decode task planning: every object once, bounded tasks, even bytes, enough tasks per CPU."""

import numpy as np
import pyarrow as pa
import pytest

from spear.stages.decode import TASKS_PER_SLOT, plan_decode_blocks


def _catalog(n, seed=0):
    rng = np.random.default_rng(seed)
    # heavy-tailed sizes, like a corpus of short clips and a few long recordings
    sizes = (rng.pareto(1.5, n) * 1e5 + 1e3).astype(np.int64)
    return pa.table({"uri": [f"s3://b/{i:05d}.flac" for i in range(n)], "size": sizes})


@pytest.mark.parametrize("n,per,slots", [(54, 8, 2), (1000, 8, 16), (5, 8, 16), (300, 3, 1)])
def test_every_object_lands_in_exactly_one_bounded_task(n, per, slots):
    cat = _catalog(n)
    blocks = plan_decode_blocks(cat, per, slots)
    uris = [u for b in blocks for u in b["uri"].to_pylist()]
    assert sorted(uris) == sorted(cat["uri"].to_pylist())
    assert max(b.num_rows for b in blocks) <= per
    assert len(blocks) == min(n, max(-(-n // per), int(np.ceil(TASKS_PER_SLOT * slots))))


def test_tasks_carry_about_equal_bytes_and_the_heaviest_comes_first():
    cat = _catalog(400, seed=3)
    sizes = cat["size"].to_numpy()
    blocks = plan_decode_blocks(cat, 8, 8)
    totals = [int(np.sum(b["size"].to_numpy())) for b in blocks]
    assert totals == sorted(totals, reverse=True)
    # contiguous slices of the size-sorted catalog (the old plan) would put the largest 8 objects in one task
    assert totals[0] < np.sort(sizes)[::-1][:8].sum()
    assert max(totals) - min(totals) <= sizes.max()


def test_the_plan_is_deterministic_and_empty_in_empty_out():
    cat = _catalog(100, seed=1)
    a = [b["uri"].to_pylist() for b in plan_decode_blocks(cat, 8, 4)]
    b = [b["uri"].to_pylist() for b in plan_decode_blocks(cat.take(np.random.default_rng(2).permutation(100)), 8, 4)]
    assert a == b
    assert plan_decode_blocks(cat.slice(0, 0), 8, 4) == []
