"""SpectCount-style synthetic counting tasks, generated on the fly (no files, no annotation).

SpectCount (Kim et al., 2026) fine-tunes an audio encoder on fully synthetic signals whose labels
are known by construction, aimed at fine-grained spectrotemporal perception: how many things
sound at once or one after another, which of two is longer or higher. The tasks here:

============ ============================================================ =====================
task         the signal                                                   label
============ ============================================================ =====================
``tones``    k simultaneous pure tones at inharmonic, distinct pitches    k - lo (k in lo..hi)
``partials`` one harmonic tone with partials 1..k of a random f0          k - lo
``onsets``   k short bursts (tone or noise) one after another             k - lo
``sweeps``   k frequency sweeps (up or down, >= 1 octave) in sequence     k - lo
``longer``   two tones in sequence, durations >= 1.4x apart               1 if the 2nd is longer
``higher``   two tones in sequence, pitches >= 2 semitones apart          1 if the 2nd is higher
============ ============================================================ =====================

Every item is 16 kHz mono float32 of a fixed duration (2 s by default: batches need no padding),
at a random level, over faint white noise (30-45 dB below the signal). Levels, pitches, timings
and timbres are drawn so that no cue but the one asked about gives the label away as far as the
task allows: every item is peak-normalised before its random level (loudness does not grow with
a count), a ``longer`` pair shares its pitch, a ``higher`` pair its duration.

A :class:`CountingGenerator` has its own ``numpy`` generator seeded by ``(seed, worker)``: two
workers (Ray Train ranks, or DataLoader workers: ``torch.utils.data.get_worker_info().id``) draw
different items, and the same pair reproduces the same stream exactly.

Example::

    >>> gen = CountingGenerator(tasks=("tones", "higher"), seed=0, worker=0)
    >>> item = next(iter(gen))
    >>> item.wav.dtype, item.wav.shape, item.task in ("tones", "higher"), gen.num_classes
    (dtype('float32'), (32000,), True, {'tones': 6, 'higher': 2})
    >>> gen.value("tones", 2)      # label 2 of "tones" is 3 tones
    3
"""

from __future__ import annotations

from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from spear.synthetic.signal import band_noise, fade, loguniform

#: The tasks, in their default order (a model's task index follows the order it was given).
COUNTING_TASKS: tuple[str, ...] = ("tones", "partials", "onsets", "sweeps", "longer", "higher")
#: Count tasks and their default count ranges (inclusive).
COUNT_RANGES: dict[str, tuple[int, int]] = {"tones": (1, 6), "partials": (1, 8), "onsets": (1, 8), "sweeps": (1, 5)}
#: Two-tone comparison tasks (labels 0: the first, 1: the second).
COMPARISON_TASKS: tuple[str, ...] = ("longer", "higher")

_MAX_COUNTS = {"tones": 10, "partials": 16, "onsets": 10, "sweeps": 6}  # what fits 2 s / the band resolvably
_GAP_S = 0.08  # silence between sequential events: an onset counter (or a listener) separates them


class CountingItem(NamedTuple):
    """One item: ``wav`` 16 kHz mono float32, ``task`` name, ``label`` class index (0 .. classes - 1)."""

    wav: np.ndarray
    task: str
    label: int


def _tone(f: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * f * np.arange(n) / sr + rng.uniform(0, 2 * np.pi))


def _distinct_pitches(rng: np.random.Generator, k: int, lo: float, hi: float, min_octaves: float) -> np.ndarray:
    """k frequencies in [lo, hi] at least ``min_octaves`` apart, none a near-multiple of another
    (an inharmonic set: a count of tones must not be read as one harmonic tone)."""
    for _ in range(1000):
        f = np.sort(np.exp(rng.uniform(np.log(lo), np.log(hi), k)))
        if k > 1 and np.diff(np.log2(f)).min() < min_octaves:
            continue
        ratios = f[None, :] / f[:, None]
        near_int = np.abs(ratios - np.round(ratios)) < 0.04
        if k > 1 and (np.triu(near_int & (ratios > 1.5), 1)).any():
            continue
        return f
    raise RuntimeError(f"could not draw {k} distinct pitches in {lo}-{hi} Hz")  # pragma: no cover


def _sequence(rng: np.random.Generator, durations: np.ndarray, n: int, sr: int) -> np.ndarray:
    """Start samples for events of ``durations`` (s) in order inside ``n`` samples, at least
    :data:`_GAP_S` apart, the spare time spread at random (before, between, after)."""
    total = float(durations.sum()) + _GAP_S * (len(durations) - 1)
    slack = n / sr - 0.1 - total  # 50 ms margin at both ends
    if slack < 0:
        raise ValueError(f"{len(durations)} events of {total:.2f} s do not fit {n / sr:.2f} s")
    spare = rng.dirichlet(np.ones(len(durations) + 1)) * slack
    starts, t = [], 0.05 + spare[0]
    for d, s in zip(durations, spare[1:]):
        starts.append(int(round(t * sr)))
        t += d + _GAP_S + s
    return np.asarray(starts)


def _place(out: np.ndarray, x: np.ndarray, start: int) -> None:
    out[start:start + len(x)] += x[: len(out) - start]


def synth_counting(task: str, value: int, rng: np.random.Generator, sample_rate: int = 16000,
                   duration: float = 2.0) -> np.ndarray:
    """The signal of ``task`` with answer ``value`` (a count, or for ``longer`` / ``higher`` 0 when the
    first tone is the longer / higher one and 1 when the second is), float64, peak 1, no noise.

    >>> import numpy as np
    >>> x = synth_counting("onsets", 3, np.random.default_rng(0))
    >>> x.shape, round(float(np.abs(x).max()), 6)
    ((32000,), 1.0)
    """
    sr, n = sample_rate, int(round(duration * sample_rate))
    nyq = 0.45 * sr
    out = np.zeros(n)
    if task == "tones":
        on = int(rng.uniform(0.02, 0.2) * sr)
        off = n - int(rng.uniform(0.02, 0.2) * sr)
        for f in _distinct_pitches(rng, value, 150.0, min(4000.0, nyq), min_octaves=0.25):
            out[on:off] += rng.uniform(0.5, 1.0) * _tone(f, off - on, sr, rng)
        out[on:off] = fade(out[on:off], sr, 0.02, 0.05)
    elif task == "partials":
        f0 = loguniform(rng, 100.0, min(400.0, 4000.0 / value))
        on = int(rng.uniform(0.02, 0.2) * sr)
        off = n - int(rng.uniform(0.02, 0.2) * sr)
        t = np.arange(off - on) / sr
        for h in range(1, value + 1):
            out[on:off] += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
        out[on:off] = fade(out[on:off], sr, 0.02, 0.05)
    elif task in ("onsets", "sweeps"):
        room = (n / sr - 0.1 - _GAP_S * (value - 1)) / value  # the longest event that still fits
        if task == "onsets":
            durations = np.array([rng.uniform(0.04, min(0.15, room)) for _ in range(value)])
        else:
            durations = np.array([rng.uniform(min(0.15, 0.6 * room), min(0.35, room)) for _ in range(value)])
        for start, d in zip(_sequence(rng, durations, n, sr), durations):
            m = int(round(d * sr))
            if task == "onsets" and rng.random() < 0.3:
                x = band_noise(rng, m, sr, loguniform(rng, 500, 4000), 1.0)
                x = x / (np.abs(x).max() + 1e-12)
            elif task == "onsets":
                x = _tone(loguniform(rng, 200, 3000), m, sr, rng)
            else:
                f_lo = loguniform(rng, 200, 1200)
                f_hi = min(f_lo * 2 ** rng.uniform(1.0, 2.5), nyq)
                f_a, f_b = (f_lo, f_hi) if rng.random() < 0.5 else (f_hi, f_lo)
                t = np.arange(m) / sr
                k = np.log(f_b / f_a) / d  # exponential sweep: f(t) = f_a * exp(k t)
                x = np.sin(2 * np.pi * f_a * (np.exp(k * t) - 1.0) / k)
            _place(out, rng.uniform(0.5, 1.0) * fade(x, sr, 0.005, 0.01), start)
    elif task in COMPARISON_TASKS:
        scale = min(1.0, duration / 2.0)  # shorter clips: shorter tones, so that both fit
        if task == "longer":
            short = loguniform(rng, 0.12, 0.45) * scale
            durations = np.array([short, short * rng.uniform(1.4, 2.0)])
            f = np.full(2, loguniform(rng, 200, 2000)) * 2 ** rng.uniform(-0.1, 0.1, 2)  # pitch is no cue
            if value == 0:
                durations = durations[::-1]
        else:
            d = rng.uniform(0.2, 0.6) * scale
            durations = d * 2 ** rng.uniform(-0.15, 0.15, 2)  # duration is no cue
            low = loguniform(rng, 200, 1500)
            f = np.array([low, low * 2 ** (rng.uniform(2, 12) / 12)])
            if value == 0:
                f = f[::-1]
        for start, d, fi in zip(_sequence(rng, durations, n, sr), durations, f):
            x = _tone(fi, int(round(d * sr)), sr, rng)
            _place(out, rng.uniform(0.7, 1.0) * fade(x, sr, 0.01, 0.01), start)
    else:
        raise ValueError(f"unknown counting task {task!r}; known: {', '.join(COUNTING_TASKS)}")
    return out / (np.abs(out).max() + 1e-12)


class CountingGenerator:
    """An endless, seeded stream of :class:`CountingItem` over ``tasks``.

    Args:
        tasks: task names (see :data:`COUNTING_TASKS`); their order is the task index order.
        ranges: per count task the inclusive (lo, hi) range of counts (default :data:`COUNT_RANGES`,
            capped to half the counts for clips under 2 s).
        seed, worker: the generator is seeded by both: workers differ, a (seed, worker) pair reproduces.
        task_weights: relative sampling weights per task (default: uniform).
        sample_rate, duration: of every item (seconds).
        noise_db: the range of the white noise level, dB below the signal's RMS (None: no noise).

    Each item draws a task by ``task_weights``, then a label uniformly among its classes.
    """

    def __init__(self, tasks: Sequence[str] = COUNTING_TASKS, ranges: Optional[Mapping[str, tuple[int, int]]] = None,
                 seed: int = 0, worker: int = 0, task_weights: Optional[Mapping[str, float]] = None,
                 sample_rate: int = 16000, duration: float = 2.0,
                 noise_db: Optional[tuple[float, float]] = (30.0, 45.0)):
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct task names, got {self.tasks}")
        unknown = sorted(set(self.tasks) - set(COUNTING_TASKS))
        if unknown:
            raise ValueError(f"unknown counting task(s) {unknown}; known: {', '.join(COUNTING_TASKS)}")
        ranges = dict(ranges or {})
        bad = sorted(set(ranges) - set(COUNT_RANGES))
        if bad:
            raise ValueError(f"ranges for task(s) {bad} that have no count range; count tasks: {list(COUNT_RANGES)}")
        if duration < 1.0:
            raise ValueError(f"duration must be >= 1 s (sequences of events must fit), got {duration}")
        self.ranges: dict[str, tuple[int, int]] = {}
        for t in self.tasks:
            if t in COUNT_RANGES:
                top = _MAX_COUNTS[t] if duration >= 2.0 else max(2, _MAX_COUNTS[t] // 2)
                if t in ranges:
                    lo, hi = (int(v) for v in ranges[t])
                else:  # the default range, capped where a short clip holds fewer events
                    lo, hi = COUNT_RANGES[t][0], min(COUNT_RANGES[t][1], top)
                if not 1 <= lo <= hi <= top:
                    raise ValueError(f"ranges[{t!r}] must satisfy 1 <= lo <= hi <= {top} at {duration:g} s, "
                                     f"got ({lo}, {hi})")
                self.ranges[t] = (lo, hi)
        weights = dict(task_weights or {})
        extra = sorted(set(weights) - set(self.tasks))
        if extra:
            raise ValueError(f"task_weights for task(s) {extra} not in tasks {self.tasks}")
        w = np.array([float(weights.get(t, 1.0)) for t in self.tasks])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"task_weights must be >= 0 with a positive sum, got {weights}")
        self.task_probs = w / w.sum()
        self.seed, self.worker = int(seed), int(worker)
        self.sample_rate, self.duration = int(sample_rate), float(duration)
        self.noise_db = noise_db
        self.rng = np.random.default_rng([self.seed, self.worker])

    @property
    def num_classes(self) -> dict[str, int]:
        """Classes per task, in task order (what a counting head's ``tasks`` argument takes)."""
        return {t: (self.ranges[t][1] - self.ranges[t][0] + 1) if t in self.ranges else 2 for t in self.tasks}

    def task_index(self, task: str) -> int:
        return self.tasks.index(task)

    def value(self, task: str, label: int) -> int:
        """What label ``label`` of ``task`` means: the count (count tasks) or 0/1 (comparisons)."""
        return label + self.ranges[task][0] if task in self.ranges else label

    def make(self, task: str, label: int, rng: Optional[np.random.Generator] = None) -> CountingItem:
        """One item of ``task`` with class ``label``, drawn from ``rng`` (default: the generator's own)."""
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not among this generator's tasks {self.tasks}")
        if not 0 <= label < self.num_classes[task]:
            raise ValueError(f"label {label} out of range 0..{self.num_classes[task] - 1} for task {task!r}")
        rng = self.rng if rng is None else rng
        x = synth_counting(task, self.value(task, label), rng, self.sample_rate, self.duration)
        x = x * loguniform(rng, 0.05, 0.7)
        if self.noise_db is not None:
            rms = np.sqrt(np.mean(x**2))
            x = x + rng.standard_normal(len(x)) * rms * 10 ** (-rng.uniform(*self.noise_db) / 20)
        return CountingItem(np.clip(x, -1.0, 1.0).astype(np.float32), task, int(label))

    def __next__(self) -> CountingItem:
        task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.task_probs))]
        return self.make(task, int(self.rng.integers(self.num_classes[task])))

    def __iter__(self) -> Iterator[CountingItem]:
        return self

    def take(self, n: int) -> list[CountingItem]:
        """The next ``n`` items."""
        return [next(self) for _ in range(n)]

    def balanced(self, per_class: int) -> list[CountingItem]:
        """``per_class`` items of every (task, label), in task and label order, from a generator of
        their own (seeded by this one's seed and worker, apart from the stream): a held-out set.

        >>> items = CountingGenerator(tasks=("higher",), seed=1).balanced(2)
        >>> [(i.task, i.label) for i in items]
        [('higher', 0), ('higher', 0), ('higher', 1), ('higher', 1)]
        """
        rng = np.random.default_rng([self.seed, self.worker, 1])
        return [self.make(t, c, rng) for t in self.tasks for c in range(self.num_classes[t]) for _ in range(per_class)]
