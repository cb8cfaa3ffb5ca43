"""Pass-1 building blocks of the quantise stage: the frame reservoir, the held-out split, the
source-balanced order and the codebook-size arithmetic (the codebook fit itself is tested in
tests/models/test_mvq.py, and pass 1 end to end in tests/pipeline/test_tokenize_job.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from spear.models.device import process_cpus, torch_threads
from spear.stages.quantize import (FrameReservoir, FrameSample, TooFewFramesError, balanced_sample, fit_quantizer,
                                   is_heldout, largest_codebook_size, settle_heldout)


def _segments(n_segments: int, dim: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"seg-{i}", rng.standard_normal((int(rng.integers(1, 40)), dim)).astype(np.float32))
            for i in range(n_segments)]


def _fill(segments, order, capacity, dim, seed=0) -> FrameReservoir:
    res = FrameReservoir(capacity, dim, seed)
    for i in order:
        sid, frames = segments[i]
        res.add(frames, sid)
    return res


def test_reservoir_sample_does_not_depend_on_arrival_order():
    segs = _segments(300, dim=4)
    total = sum(f.shape[0] for _, f in segs)
    capacity = total // 5
    a = _fill(segs, range(len(segs)), capacity, 4).sample()
    b = _fill(segs, np.random.default_rng(7).permutation(len(segs)), capacity, 4).sample()
    assert a.shape == (capacity, 4)
    np.testing.assert_array_equal(a, b)  # same frames, same (key) order


def test_reservoir_sample_changes_with_its_seed_and_keeps_frames_intact():
    segs = _segments(200, dim=3)
    capacity = 500
    a = _fill(segs, range(len(segs)), capacity, 3, seed=0).sample()
    c = _fill(segs, range(len(segs)), capacity, 3, seed=1).sample()
    assert not np.array_equal(a, c)
    every_frame = {tuple(r) for _, f in segs for r in f}
    assert all(tuple(r) in every_frame for r in a)  # whole frames, never mixed rows
    assert len({tuple(r) for r in a}) == capacity   # no frame twice


def test_reservoir_below_capacity_keeps_everything_and_counts_what_it_saw():
    segs = _segments(10, dim=2)
    total = sum(f.shape[0] for _, f in segs)
    res = _fill(segs, range(len(segs)), total + 100, 2)
    assert res.seen == total
    assert res.sample().shape == (total, 2)
    res.add(np.zeros((0, 2), np.float32), "empty")  # an empty segment changes nothing
    assert res.seen == total


def test_reservoir_is_uniform_over_segments():
    # 100 segments x 50 frames, keep 10 %: each segment's share should be near 5 frames
    dim, per = 1, 50
    res = FrameReservoir(500, dim, seed=3)
    for i in range(100):
        res.add(np.full((per, dim), i, np.float32), f"s{i}")
    counts = np.bincount(res.sample()[:, 0].astype(int), minlength=100)
    assert counts.sum() == 500
    assert counts.max() <= 16 and (counts > 0).sum() >= 90


def test_heldout_split_is_fixed_and_near_its_fraction():
    ids = [f"segment-{i}" for i in range(4000)]
    held = [is_heldout(s, 0.1) for s in ids]
    assert held == [is_heldout(s, 0.1) for s in ids]
    assert 0.08 < sum(held) / len(ids) < 0.12
    assert not any(is_heldout(s, 0.0) for s in ids)


def _split(sizes: list[int], names: list[str], fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1's split of segments ``names`` (frames of segment i are all i) into reservoirs, then settled."""
    train, held = FrameReservoir(1000, 1, 0), FrameReservoir(max(1, int(1000 * fraction)), 1, 1)
    for i, (name, n) in enumerate(zip(names, sizes)):
        (held if is_heldout(name, fraction) else train).add(np.full((n, 1), i, np.float32), name)
    return settle_heldout(train.sample(), held.sample(), heldout_seen=held.seen, seen=train.seen + held.seen,
                          fraction=fraction)


def test_a_few_segments_hold_out_their_fraction_of_frames_whichever_segments_fall_out():
    """CI once refused a 3-segment audio fit: an Ogg file's random stream serial changed its content hash, so
    its segment fell out on some runs, taking half the frames (48 of 101 left for the fit, 64 needed)."""
    outcomes = set()
    for trial in range(300):  # segment ids as content hashes would give them: any of them may fall out
        train, held = _split([50, 30, 21], [f"trial{trial}-{i}" for i in range(3)])
        outcomes.add((train.shape[0], held.shape[0]))
    assert outcomes == {(91, 10)}
    # nothing is lost or repeated: the two parts together are the segments' frames
    train, held = _split([50, 30, 21], ["a", "b", "c"])
    assert sorted(np.concatenate([train, held])[:, 0].tolist()) == [0] * 50 + [1] * 30 + [2] * 21


def test_on_a_large_corpus_the_split_by_segment_stands():
    names = [f"segment-{i}" for i in range(400)]
    train, held = _split([10] * 400, names)
    out = {i for i, name in enumerate(names) if is_heldout(name, 0.1)}
    assert 20 < len(out) < 60 and held.shape[0] == 100  # the held-out reservoir's capacity, all from out
    assert set(held[:, 0].astype(int).tolist()) <= out and train.shape[0] == 1000
    assert not out & set(train[:, 0].astype(int).tolist())  # no held-out segment is fitted on


def test_balanced_sample_interleaves_sources_and_filters_domains():
    objects = pa.table({"uri": [f"u{i}" for i in range(9)],
                        "source": ["a"] * 6 + ["b"] * 2 + ["c"],
                        "domain": ["speech"] * 6 + ["audio"] * 3})
    ordered = balanced_sample(objects, seed=0)
    first = ordered["source"].to_pylist()[:3]
    assert sorted(first) == ["a", "b", "c"]  # one of each source before any second
    assert sorted(ordered["uri"].to_pylist()) == sorted(objects["uri"].to_pylist())
    assert ordered.to_pylist() == balanced_sample(objects, seed=0).to_pylist()
    audio = balanced_sample(objects, seed=0, domains=["audio"])
    assert set(audio["domain"].to_pylist()) == {"audio"} and audio.num_rows == 3


@pytest.mark.parametrize("frames,per_entry,expected", [(10_240, 40, 256), (10_239, 40, 128), (80, 40, 2), (79, 40, None)])
def test_largest_codebook_size(frames, per_entry, expected):
    assert largest_codebook_size(frames, per_entry) == expected


def test_too_few_frames_error_says_what_is_needed():
    err = TooFewFramesError(frames=100, codebook_size=256, min_per_entry=4)
    assert err.needed == 1024 and "need at least 1024" in str(err)


def test_a_fit_reports_each_initialised_codebook_and_refinement_pass():
    """A CPU fit of the demo's 16 x 256 speech codebooks takes about 3 minutes: the log shows it advance."""
    frames = np.random.default_rng(0).standard_normal((1200, 8)).astype(np.float32)
    sample = FrameSample(train=frames[:1000], heldout=frames[1000:], segments=10, audio_seconds=40.0,
                         sources={"a": 10})
    lines: list[str] = []
    q = fit_quantizer(sample, num_codebooks=3, codebook_size=16, seed=0, teacher_id="t" * 16, layer=None, extra={},
                      refine_iters=2, log=lines.append)
    assert q.num_codebooks == 3
    inits = [line for line in lines if line.startswith("k-means init codebook")]
    assert [line.split(":")[0] for line in inits] == [f"k-means init codebook {c}/3" for c in (1, 2, 3)]
    assert any(line.startswith("initialised 3 x 16 codebooks in") for line in lines), lines
    assert lines[-2].startswith("refinement stopped after"), lines
    assert lines[-1].startswith("fitted in") and lines[-1].endswith(f"held-out loss {q.metadata['heldout_relative_loss']:.4f}")


def test_a_fit_on_read_only_frames_copies_them_without_a_warning_and_its_task_logger_pickles(capsys):
    """A GPU node fits in a Ray task, whose frames come read-only from the object store (torch warned that
    writing to them was undefined); the task's progress lines go to its stderr, which Ray forwards."""
    import pickle
    import warnings

    from spear.cluster.console import console_log

    frames = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    frames.setflags(write=False)
    sample = FrameSample(train=frames[:500], heldout=frames[500:], segments=5, audio_seconds=20.0, sources={"a": 5})
    log = pickle.loads(pickle.dumps(console_log(prefix="[tokenize] speech codebooks: ")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = fit_quantizer(sample, num_codebooks=2, codebook_size=16, seed=0, teacher_id="t" * 16, layer=None,
                          extra={}, refine_iters=0, log=log)
    assert q.num_codebooks == 2 and not frames.flags.writeable
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[tokenize] speech codebooks: k-means init codebook 1/2: "), err
    assert err[-1].startswith("[tokenize] speech codebooks: fitted in"), err


@pytest.mark.skipif(process_cpus() < 2, reason="one CPU: every process fits on one thread")
def test_the_fit_gives_the_same_codebooks_whatever_threads_the_process_was_left_on():
    """The fit's floats follow torch's thread count (on these frames, 1 and 2 threads gave other codebooks and
    other codes). CI's full suite ran the demo check after a test had left torch on one thread, so its
    codebooks, tokens and student differed from the same check run alone. A fit now runs on every CPU the
    process may use unless told otherwise."""
    rng = np.random.default_rng(0)
    frames = (rng.standard_normal((3000, 64)) @ rng.standard_normal((64, 64))).astype(np.float32)
    sample = FrameSample(train=frames[:2700], heldout=frames[2700:], segments=30, audio_seconds=60.0, sources={"a": 30})

    def fit():
        return fit_quantizer(sample, num_codebooks=4, codebook_size=32, seed=0, teacher_id="t" * 16, layer=None,
                             extra={}, refine_iters=2).codebooks

    with torch_threads(process_cpus()):
        default = fit()
    with torch_threads(1):
        left_on_one = fit()
        assert torch.get_num_threads() == 1  # the fit gave the caller its setting back
    assert torch.equal(default, left_on_one)
