"""Probe tasks: what each task labels, read from the demo corpus' labels or a user manifest.

A :class:`Task` names items of an :class:`ItemTable` (the distinct audio URIs every task
refers to by index) with their split and their labels:

==================  =========  ==================================================
task                level      items and label
==================  =========  ==================================================
``speaker``         utterance  speech-domain clips: the espeak-ng voice
``word``            utterance  single-word clips: the word
``event``           utterance  sound-event clips: the primary (loudest) event class
``event_count``     utterance  sound-event clips: number of events (1-5, 5 classes)
``speech_vs_audio`` utterance  all clips: domain (speech-only vs audio)
``mixed_event``     utterance  speech + event mixtures: the primary event class
``mixed_speaker``   utterance  speech + event mixtures: the voice
``mixed_has_speech`` utterance audio-domain clips: does the clip contain speech
``pitch``           utterance  pitched tones (timbre independent of pitch, in noise): the f0 band
``frame_speech``    frame      all clips, every 0.25 s: is speech active
``frame_event``     frame      audio-domain clips, every 0.25 s: is an event active
<manifest stem>     utterance  a user manifest (CSV or JSONL: uri, label[, split])
==================  =========  ==================================================

The built-in tasks come from the demo corpus' ``labels.jsonl`` (written by `spear demo`);
the others from user manifests (:func:`load_manifest_task`). Utterance tasks carry one label
per item; frame tasks carry the intervals where the positive class is active, labelled on a
grid of 0.25 s points (:func:`frame_grid`). Splits are fixed: the corpus' ``split`` field, a
manifest's ``split`` column, else a hash of the manifest's uri string (20 % test,
:func:`hash_split`).

Example::

    from spear.cluster.storage import Storage
    from spear.evaluation.tasks import TaskSources, load_tasks

    tasks, items = load_tasks(TaskSources(corpus_root="spear-demo/corpus", manifests=["speakers.csv"]),
                              Storage())
    print([t.name for t in tasks], len(items.uris))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import numpy as np

from spear.cluster.storage import Storage, join_uri
from spear.stages.manifests import read_manifest_rows, resolve_manifest_path

FRAME_HOP_SECONDS = 0.25  # frame tasks: one labelled point every 0.25 s
TEST_FRACTION = 0.2  # hash split of manifests without a split column
LABELS_FILE = "labels.jsonl"  # the demo corpus' label rows, under its root

BUILTIN_TASKS: dict[str, str] = {
    "speaker": "speech-domain clips: which espeak-ng voice",
    "word": "single-word clips: which word",
    "event": "sound-event clips: primary (loudest) event class",
    "event_count": "sound-event clips: number of events (1-5)",
    "speech_vs_audio": "all clips: speech-only vs audio domain",
    "mixed_event": "speech + event mixtures: primary event class",
    "mixed_speaker": "speech + event mixtures: which voice",
    "mixed_has_speech": "audio-domain clips: does the clip contain speech",
    # Pitch is what a pitch network knows and a spectral envelope does not say (the tones' timbre is
    # drawn independently of their fundamental, some have none): a teacher-knowledge task.
    "pitch": "pitched tones in noise, timbre independent of pitch: which quarter-octave (3-semitone) f0 band",
    "frame_speech": "all clips, every 0.25 s: is speech active",
    "frame_event": "audio-domain clips, every 0.25 s: is a sound event active",
}


@dataclass
class Task:
    """One probing task over items of the item table.

    Utterance tasks carry one label per item; frame tasks carry per item the time
    intervals where the positive class is active (labels are derived on the frame grid).
    """

    name: str
    level: Literal["utterance", "frame"]
    source: str  # "demo corpus" or the manifest URI
    description: str
    items: list[int]
    splits: list[str]
    labels: list[str] = field(default_factory=list)
    intervals: list[list[tuple[float, float]]] = field(default_factory=list)
    positive: str = "active"
    negative: str = "inactive"

    def keep(self, ok: Callable[[int], bool]) -> "Task":
        """The task restricted to the items ``ok`` accepts."""
        idx = [k for k, i in enumerate(self.items) if ok(i)]
        return Task(self.name, self.level, self.source, self.description, [self.items[k] for k in idx],
                    [self.splits[k] for k in idx], [self.labels[k] for k in idx] if self.labels else [],
                    [self.intervals[k] for k in idx] if self.intervals else [], self.positive, self.negative)


class ItemTable:
    """The table of distinct audio URIs that tasks refer to by index.

    Example::

        >>> items = ItemTable()
        >>> items.add("s3://b/a.wav", "speech"), items.add("s3://b/a.wav", "speech"), items.add("s3://b/c.wav", "audio")
        (0, 0, 1)
    """

    def __init__(self) -> None:
        self.uris: list[str] = []
        self.domains: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, uri: str, domain: str) -> int:
        if "://" not in uri:  # one key per local file however it was spelled ("a/../b", relative)
            uri = os.path.abspath(uri)
        if uri not in self._index:
            self._index[uri] = len(self.uris)
            self.uris.append(uri)
            self.domains.append(domain)
        return self._index[uri]


def _intervals(pairs: Iterable[Sequence[Any]]) -> list[tuple[float, float]]:
    return [(float(p[0]), float(p[1])) for p in pairs]


def demo_tasks(labels: list[dict[str, Any]], corpus_root: str, items: ItemTable) -> list[Task]:
    """The built-in tasks (:data:`BUILTIN_TASKS`) from the demo corpus' label rows."""
    rows = [(items.add(join_uri(corpus_root, r["path"]), r["domain"]), r) for r in labels]

    def task(name: str, pick: Callable[[dict], bool], label: Callable[[dict], Any]) -> Task:
        chosen = [(i, r) for i, r in rows if pick(r)]
        return Task(name, "utterance", "demo corpus", BUILTIN_TASKS[name], [i for i, _ in chosen],
                    [r["split"] for _, r in chosen], labels=[str(label(r)) for _, r in chosen])

    def frame_task(name: str, pick: Callable[[dict], bool], spans: Callable[[dict], list], pos: str, neg: str) -> Task:
        chosen = [(i, r) for i, r in rows if pick(r)]
        return Task(name, "frame", "demo corpus", BUILTIN_TASKS[name], [i for i, _ in chosen],
                    [r["split"] for _, r in chosen], intervals=[_intervals(spans(r)) for _, r in chosen],
                    positive=pos, negative=neg)

    speech_kinds = ("word", "sentence", "long_speech")
    return [
        task("speaker", lambda r: r["kind"] in speech_kinds, lambda r: r["speaker"]),
        task("word", lambda r: r["kind"] == "word", lambda r: r["word"]),
        task("event", lambda r: r["kind"] == "events", lambda r: r["primary_event"]),
        task("event_count", lambda r: r["kind"] == "events", lambda r: r["event_count"]),
        task("speech_vs_audio", lambda r: True, lambda r: r["domain"]),
        task("mixed_event", lambda r: r["kind"] == "mixed", lambda r: r["primary_event"]),
        task("mixed_speaker", lambda r: r["kind"] == "mixed", lambda r: r["speaker"]),
        task("mixed_has_speech", lambda r: r["domain"] == "audio",
             lambda r: "speech" if r["has_speech"] else "no_speech"),
        task("pitch", lambda r: r["kind"] == "pitched", lambda r: r["pitch_band"]),
        frame_task("frame_speech", lambda r: True, lambda r: [s[:2] for s in r.get("speech_segments") or []],
                   "speech", "no_speech"),
        frame_task("frame_event", lambda r: r["domain"] == "audio", lambda r: r.get("event_times") or [],
                   "event", "no_event"),
    ]


# --------------------------------------------------------------------------- manifests

_TRAIN_SPLITS = {"train", "training", "dev", "valid", "val", "validation"}
_TEST_SPLITS = {"test", "eval", "evaluation"}


def hash_split(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """"test" for a fixed ``test_fraction`` of keys (by sha256 of the key), else "train"."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 10_000 < int(round(test_fraction * 10_000)) else "train"


def load_manifest_task(uri: str, items: ItemTable, storage: Storage, name: Optional[str] = None) -> Task:
    """A labelled manifest (CSV/TSV with a header, or JSONL) as an utterance task.

    Each row needs ``uri`` (also accepted: ``path``, ``audio``; relative paths are relative
    to the manifest's folder) and ``label``; an optional ``split`` is train/test (dev, valid
    and val count as train: the probe carves its own validation set). Rows without a split
    go to test for a fixed 20 % of their uri strings (sha256), so the split survives
    reordering and appending. The task is named after the file (``speakers.csv`` -> ``speakers``).
    """
    rows = [row for _, row in read_manifest_rows(uri, storage)]
    if not rows:
        raise ValueError(f"{uri}: the manifest has no rows")
    task_name = name or os.path.splitext(posixpath.basename(uri.rstrip("/")))[0]
    item_ids, labels, splits = [], [], []
    for n, row in enumerate(rows, 1):
        audio = row.get("uri") or row.get("path") or row.get("audio")
        label = row.get("label")
        if not audio or label is None or str(label) == "":
            raise ValueError(f"{uri}: row {n} needs `uri` and `label` (got keys {sorted(row)})")
        audio = str(audio)
        resolved = resolve_manifest_path(uri, audio)
        split = str(row.get("split") or "").strip().lower()
        if not split:
            split = hash_split(audio)
        elif split in _TRAIN_SPLITS:
            split = "train"
        elif split in _TEST_SPLITS:
            split = "test"
        else:
            raise ValueError(f"{uri}: row {n} has split {row.get('split')!r}; use train or test (or leave it empty)")
        item_ids.append(items.add(resolved, f"manifest:{task_name}"))
        labels.append(str(label))
        splits.append(split)
    return Task(task_name, "utterance", uri, f"user manifest {posixpath.basename(uri)}", item_ids, splits,
                labels=labels)


# --------------------------------------------------------------------------- the task set


@dataclass(frozen=True)
class TaskSources:
    """Where the tasks come from: a demo corpus and/or labelled manifests, optionally filtered.

    ``corpus_root``: a demo corpus (a folder with ``labels.jsonl``; None: manifests only).
    ``manifests``: CSV/JSONL task files (see :func:`load_manifest_task`). ``names``: keep only
    these task names (None: every task).
    """

    corpus_root: Optional[str] = None
    manifests: Sequence[str] = ()
    names: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        if self.corpus_root is None and not self.manifests:
            raise ValueError("nothing to evaluate on: give a corpus root (demo corpus) and/or manifests")


def load_tasks(sources: TaskSources, storage: Storage) -> tuple[list[Task], ItemTable]:
    """Every task of ``sources`` (built-in ones first; a manifest whose name is taken gets
    ``_2``, ``_3``, ...) and the item table they index."""
    items = ItemTable()
    tasks: list[Task] = []
    if sources.corpus_root is not None:
        labels_uri = join_uri(sources.corpus_root, LABELS_FILE)
        if not storage.exists(labels_uri):
            raise FileNotFoundError(f"{labels_uri} does not exist: corpus_root must be a demo corpus "
                                    "(generate one with `spear demo`) or use manifests")
        rows = [json.loads(line) for line in storage.read_text(labels_uri).splitlines() if line.strip()]
        tasks += demo_tasks(rows, sources.corpus_root, items)
    for m in sources.manifests:
        task = load_manifest_task(m, items, storage)
        taken = {t.name for t in tasks}
        name, k = task.name, 2
        while name in taken:
            name, k = f"{task.name}_{k}", k + 1
        task.name = name
        tasks.append(task)
    if sources.names is not None:
        unknown = sorted(set(sources.names) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in set(sources.names)]
    return tasks, items


def probe_test_uris(sources: TaskSources, storage: Storage) -> set[str]:
    """The audio URIs that are a test item of at least one task of ``sources``: the clips a
    pre-training run must not see for the probes to stay inductive. The split is the one the
    probes use (:func:`load_tasks`: the corpus' ``split`` field, a manifest's ``split`` column,
    else :func:`hash_split`); local paths come back absolute, as :class:`ItemTable` keys them.

    Example::

        held = probe_test_uris(TaskSources(corpus_root="spear-demo/corpus"), Storage())
    """
    tasks, items = load_tasks(sources, storage)
    return {items.uris[i] for t in tasks for i, split in zip(t.items, t.splits) if split == "test"}


# --------------------------------------------------------------------------- labels on features


def frame_grid(seconds: float, hop: float = FRAME_HOP_SECONDS) -> np.ndarray:
    """Grid times (s) of the frame tasks: the centres of consecutive ``hop`` windows inside the clip."""
    return (np.arange(int(math.floor(seconds / hop + 1e-9))) + 0.5) * hop


def _active(times: np.ndarray, spans: Sequence[tuple[float, float]]) -> np.ndarray:
    """Which grid ``times`` fall inside one of the ``[start, end)`` spans."""
    active = np.zeros(len(times), dtype=bool)
    for a, b in spans:
        active |= (times >= a) & (times < b)
    return active


def label_counts(task: Task, grids: dict[int, np.ndarray]) -> dict[str, dict[str, int]]:
    """``{"train": {label: count}, "test": {...}}``: items (utterance tasks) or grid points (frame tasks)."""
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    if task.level == "utterance":
        for lab, split in zip(task.labels, task.splits):
            counts[split][lab] = counts[split].get(lab, 0) + 1
    else:
        for i, spans, split in zip(task.items, task.intervals, task.splits):
            active = _active(grids.get(i, np.zeros(0)), spans)
            for lab, n in ((task.positive, int(active.sum())), (task.negative, int((~active).sum()))):
                if n:
                    counts[split][lab] = counts[split].get(lab, 0) + n
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def skip_reason(task: Task, counts: dict[str, dict[str, int]]) -> Optional[str]:
    """Why ``task`` cannot be probed (None: it can), from its :func:`label_counts`."""
    if not task.items:
        return "no items"
    if len(counts["train"]) < 2:
        return f"training split has {len(counts['train'])} class(es); a probe needs 2"
    if not counts["test"]:
        return "empty test split"
    return None


def task_arrays(task: Task, pooled: np.ndarray, frames: dict[int, np.ndarray], grids: dict[int, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(x_train, y_train, x_test, y_test, groups_train, groups_test) of one layer's features.

    ``pooled``: [num_items, D] clip means (utterance tasks); ``frames``: item -> [grid points, D]
    (frame tasks, whose groups are the items so that a clip's frames stay together)."""
    if task.level == "utterance":
        x = pooled[task.items]
        y = np.asarray(task.labels)
        tr = np.array([s == "train" for s in task.splits])
        return x[tr], y[tr], x[~tr], y[~tr], None, None
    xs, ys, gs, ss = [], [], [], []
    for i, spans, split in zip(task.items, task.intervals, task.splits):
        t = grids[i]
        if len(t) == 0:
            continue
        active = _active(t, spans)
        xs.append(frames[i])
        ys.append(np.where(active, task.positive, task.negative))
        gs.append(np.full(len(t), i))
        ss.append(np.full(len(t), split == "train"))
    x, y, g, tr = np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), np.concatenate(ss)
    return x[tr], y[tr], x[~tr], y[~tr], g[tr], g[~tr]
