"""The SpectCount-style generator: every label checked against its signal by detectors written
apart from the generator (spectral peaks, an energy envelope's peaks and segments, a segment's
dominant frequency), seeded reproducibility, workers that differ, argument errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.signal

import spear.synthetic.counting as counting
from spear.synthetic.counting import COUNTING_TASKS, CountingGenerator

SR = 16000


def spectral_peaks(x: np.ndarray) -> np.ndarray:
    """Frequencies of the spectrum's peaks within 20 dB of the strongest (Hann window, whole clip)."""
    db = 20 * np.log10(np.abs(np.fft.rfft(x * np.hanning(len(x)))) + 1e-12)
    f = np.fft.rfftfreq(len(x), 1 / SR)
    band = (f > 60) & (f < 7000)
    db = np.where(band, db, -300.0)
    idx, _ = scipy.signal.find_peaks(db, height=db.max() - 20, prominence=20, distance=int(20 / f[1]))
    return f[idx]


def envelope_db(x: np.ndarray, hop: float = 0.005, win: float = 0.02) -> np.ndarray:
    h, w = int(hop * SR), int(win * SR)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x, (w // 2, w // 2)), w)[::h]
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20)


def onset_count(x: np.ndarray) -> int:
    """Peaks of the energy envelope that stand 15 dB above the dips around them."""
    idx, _ = scipy.signal.find_peaks(envelope_db(x), prominence=15, distance=8)
    return len(idx)


def segments(x: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) seconds of the stretches within 20 dB of the loudest envelope frame."""
    env = envelope_db(x)
    d = np.diff(np.r_[0, (env > env.max() - 20).astype(int), 0])
    return [(a * 0.005, b * 0.005) for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


def dominant_frequency(x: np.ndarray, start: float, end: float) -> float:
    seg = x[int(start * SR):int(end * SR)]
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), n=1 << 16))
    return float(np.fft.rfftfreq(1 << 16, 1 / SR)[spec.argmax()])


def detect(task: str, x: np.ndarray) -> int:
    """The answer read off the signal alone."""
    x = x.astype(np.float64)
    if task in ("tones", "partials"):
        return len(spectral_peaks(x))
    if task in ("onsets", "sweeps"):
        return onset_count(x)
    seg = segments(x)
    if len(seg) != 2:
        return -len(seg)
    if task == "longer":
        return int(seg[1][1] - seg[1][0] > seg[0][1] - seg[0][0])
    return int(dominant_frequency(x, *seg[1]) > dominant_frequency(x, *seg[0]))


def test_docstring_examples_hold():
    assert doctest.testmod(counting).failed == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_every_label_matches_an_independent_detector(seed):
    gen = CountingGenerator(seed=seed)
    items = gen.balanced(per_class=3)  # every (task, label), 3 times: 6+8+8+5+2+2 classes
    assert len(items) == 3 * sum(gen.num_classes.values()) == 93
    wrong = [(i.task, gen.value(i.task, i.label), detect(i.task, i.wav)) for i in items
             if detect(i.task, i.wav) != gen.value(i.task, i.label)]
    assert not wrong, wrong
    for i in items:
        assert i.wav.dtype == np.float32 and i.wav.shape == (2 * SR,)
        assert 0.0 < np.abs(i.wav).max() <= 1.0


def test_the_stream_samples_tasks_and_labels_and_matches_the_detectors():
    gen = CountingGenerator(seed=5, worker=2, ranges={"onsets": (2, 4)},
                            task_weights={"onsets": 3.0, "higher": 1.0}, tasks=("onsets", "higher"))
    items = gen.take(60)
    tasks = [i.task for i in items]
    assert 30 <= tasks.count("onsets") <= 58  # weights 3:1
    assert {i.label for i in items if i.task == "onsets"} == {0, 1, 2}  # counts 2, 3, 4
    assert gen.num_classes == {"onsets": 3, "higher": 2}
    for i in items[:20]:
        assert detect(i.task, i.wav) == gen.value(i.task, i.label)


def test_same_seed_reproduces_other_workers_differ():
    a = CountingGenerator(seed=3, worker=0).take(8)
    b = CountingGenerator(seed=3, worker=0).take(8)
    c = CountingGenerator(seed=3, worker=1).take(8)
    d = CountingGenerator(seed=4, worker=0).take(8)
    assert all(np.array_equal(x.wav, y.wav) and x.task == y.task and x.label == y.label for x, y in zip(a, b))
    for other in (c, d):
        assert not any(np.array_equal(x.wav, y.wav) for x, y in zip(a, other))
    # a held-out set does not depend on how much of the stream was drawn
    g1, g2 = CountingGenerator(seed=3), CountingGenerator(seed=3)
    g2.take(5)
    assert all(np.array_equal(x.wav, y.wav) for x, y in zip(g1.balanced(1), g2.balanced(1)))


def test_shorter_clips_and_no_noise():
    gen = CountingGenerator(seed=0, duration=1.0, noise_db=None)
    assert gen.ranges["onsets"] == (1, 5)  # the default range, capped: 8 bursts do not fit 1 s apart
    with pytest.raises(ValueError, match=r"ranges\['onsets'\]"):
        CountingGenerator(duration=1.0, ranges={"onsets": (1, 8)})
    items = gen.balanced(per_class=2)
    assert all(i.wav.shape == (SR,) for i in items)
    wrong = [(i.task, gen.value(i.task, i.label), detect(i.task, i.wav)) for i in items
             if detect(i.task, i.wav) != gen.value(i.task, i.label)]
    assert not wrong, wrong
    silent = [np.abs(i.wav[: int(0.01 * SR)]).max() for i in items if i.task in ("onsets", "sweeps")]
    assert min(silent) == 0.0  # no noise floor: the 10 ms before the first event are exact zeros


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown counting task"):
        CountingGenerator(tasks=("tones", "chords"))
    with pytest.raises(ValueError, match=r"ranges\['tones'\]"):
        CountingGenerator(ranges={"tones": (0, 3)})
    with pytest.raises(ValueError, match="no count range"):
        CountingGenerator(ranges={"higher": (1, 2)})
    with pytest.raises(ValueError, match="task_weights"):
        CountingGenerator(tasks=("tones",), task_weights={"onsets": 1.0})
    with pytest.raises(ValueError, match="label 7 out of range"):
        CountingGenerator(tasks=("tones",)).make("tones", 7)
    assert set(COUNTING_TASKS) == {"tones", "partials", "onsets", "sweeps", "longer", "higher"}
