"""bench/teacher_memory.py on the pretrained teachers: the memory tokenize reserves for a teacher actor covers
what the teacher stage uses on a Ray batch, with the room Ray Data asks for (its detector warns above 4/5)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def teacher_memory(bench_module):
    return bench_module("teacher_memory")


@pytest.mark.slow
@pytest.mark.parametrize("kind, rows, seconds", [
    ("resemblyzer", 24, 30.0),  # the batch and its 256-dim embeddings at 50 Hz make most of the peak
    ("crepe", 4, 30.0),         # one full 120 s sub-batch: CREPE's activations at their bound
])
def test_the_reservation_covers_a_batch_with_ray_datas_headroom(teacher_memory, kind, rows, seconds):
    r = teacher_memory.measure_in_child(kind, rows, seconds, 120.0, timeout=600)
    assert r["peak_mib"] > r["loaded_mib"] + 50  # the batch was run: it used memory beyond the loaded teacher
    assert r["ratio"] >= teacher_memory.WARN_RATIO, r
