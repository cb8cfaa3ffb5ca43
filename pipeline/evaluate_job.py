"""The evaluation job (`spear evaluate`): linear probes on frozen features, with a report.

Every model's features are extracted once per clip, then a linear probe
(:mod:`spear.models.probes`) is fitted per (task, model, layer):

Models (the ``model`` field of every result):

- ``student``: an exported student (:func:`spear.models.student.load_student`), every
  encoder layer (``layer`` 1..L, or the subset ``layers`` selects);
- ``random_student``: the same encoder architecture and size, randomly initialised with
  seed :data:`RANDOM_STUDENT_SEED` (what the architecture alone gives);
- ``teacher:<name>``: each teacher's embeddings (``teacher:mfcc``, ``teacher:fbank``,
  ``teacher:wavlm``, ...; ``@<layer>`` is appended when a layer is set and two teachers would
  otherwise share a name). Note that ``teacher:fbank`` is the *audio teacher* (log-mel pooled
  to 25 Hz) and differs from the floor below;
- ``fbank``: the raw 128-bin Kaldi log-mel fbank at 100 Hz, the floor every learned
  representation should beat.

Tasks (the ``task`` field), from the demo corpus' ``labels.jsonl`` (see
:func:`spear.pipeline.demo_corpus.generate_demo_corpus`) and from user manifests:

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
``frame_speech``    frame      all clips, every 0.25 s: is speech active
``frame_event``     frame      audio-domain clips, every 0.25 s: is an event active
<manifest stem>     utterance  a user manifest (CSV or JSONL: uri, label[, split])
==================  =========  ==================================================

Utterance tasks mean-pool each layer over the clip's frames; frame tasks take the frame
under each 0.25 s grid point (frame index ``floor(t * frame_rate)``), and their validation
carve and bootstrap work on whole clips. Splits are fixed: the corpus' ``split`` field, a
manifest's ``split`` column, else a hash of the manifest's uri string (20 % test). The
score is test accuracy, the mean over ``seeds``; ``ci`` is a 95 % bootstrap interval over
test items (see :mod:`spear.models.probes`).

Output (``output``: a local path or s3:// prefix): ``index.html`` with PNG plots next to it
and ``results.json`` (= :meth:`EvaluateSummary.to_dict`), see :mod:`spear.pipeline.report`.

Example::

    from spear.config import TeacherConfig
    from spear.pipeline.evaluate_job import run_evaluate
    summary = run_evaluate("runs/student", "spear-demo/corpus", output="runs/eval",
                           teachers=[TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank")])
    print(summary.best["word"]["student"], summary.report)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from spear.cluster.storage import Storage, join_uri

RANDOM_STUDENT_SEED = 0
FRAME_HOP_SECONDS = 0.25  # frame tasks: one labelled point every 0.25 s
TEST_FRACTION = 0.2  # hash split of manifests without a split column
MAX_CLIP_SECONDS = 600.0  # longer clips are truncated (probes pool over at most this much)
FBANK_BINS = 128

BUILTIN_TASKS: dict[str, str] = {
    "speaker": "speech-domain clips: which espeak-ng voice",
    "word": "single-word clips: which word",
    "event": "sound-event clips: primary (loudest) event class",
    "event_count": "sound-event clips: number of events (1-5)",
    "speech_vs_audio": "all clips: speech-only vs audio domain",
    "mixed_event": "speech + event mixtures: primary event class",
    "mixed_speaker": "speech + event mixtures: which voice",
    "mixed_has_speech": "audio-domain clips: does the clip contain speech",
    "frame_speech": "all clips, every 0.25 s: is speech active",
    "frame_event": "audio-domain clips, every 0.25 s: is a sound event active",
}


# --------------------------------------------------------------------------- tasks


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


class _Items:
    """The table of distinct audio URIs that tasks refer to by index."""

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


def demo_tasks(labels: list[dict[str, Any]], corpus_root: str, items: _Items) -> list[Task]:
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
        frame_task("frame_speech", lambda r: True, lambda r: [s[:2] for s in r.get("speech_segments") or []],
                   "speech", "no_speech"),
        frame_task("frame_event", lambda r: r["domain"] == "audio", lambda r: r.get("event_times") or [],
                   "event", "no_event"),
    ]


_TRAIN_SPLITS = {"train", "training", "dev", "valid", "val", "validation"}
_TEST_SPLITS = {"test", "eval", "evaluation"}


def hash_split(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """"test" for a fixed ``test_fraction`` of keys (by sha256 of the key), else "train"."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 10_000 < int(round(test_fraction * 10_000)) else "train"


def _manifest_rows(uri: str, storage: Storage) -> list[dict[str, Any]]:
    text = storage.read_text(uri)
    lower = uri.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{uri}: line {n} is not JSON ({exc})") from None
        return rows
    if lower.endswith((".csv", ".tsv")):
        dialect = "excel-tab" if lower.endswith(".tsv") else "excel"
        return list(csv.DictReader(io.StringIO(text), dialect=dialect))
    raise ValueError(f"{uri}: a manifest must be .csv, .tsv or .jsonl")


def load_manifest_task(uri: str, items: _Items, storage: Storage, name: Optional[str] = None) -> Task:
    """A labelled manifest (CSV/TSV with a header, or JSONL) as an utterance task.

    Each row needs ``uri`` (also accepted: ``path``, ``audio``; relative paths are relative
    to the manifest's folder) and ``label``; an optional ``split`` is train/test (dev, valid
    and val count as train: the probe carves its own validation set). Rows without a split
    go to test for a fixed 20 % of their uri strings (sha256), so the split survives
    reordering and appending. The task is named after the file (``speakers.csv`` -> ``speakers``).
    """
    rows = _manifest_rows(uri, storage)
    if not rows:
        raise ValueError(f"{uri}: the manifest has no rows")
    base = posixpath.dirname(uri) if "://" in uri else os.path.dirname(os.path.abspath(uri))
    task_name = name or os.path.splitext(posixpath.basename(uri.rstrip("/")))[0]
    item_ids, labels, splits = [], [], []
    for n, row in enumerate(rows, 1):
        audio = row.get("uri") or row.get("path") or row.get("audio")
        label = row.get("label")
        if not audio or label is None or str(label) == "":
            raise ValueError(f"{uri}: row {n} needs `uri` and `label` (got keys {sorted(row)})")
        audio = str(audio)
        resolved = audio if ("://" in audio or os.path.isabs(audio)) else join_uri(base, audio)
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


# --------------------------------------------------------------------------- audio


@dataclass
class _Clip:
    pcm: np.ndarray  # int16, 16 kHz mono
    format: str
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 16000.0


def _decode(uri: str, storage: Storage) -> _Clip:
    from spear.stages.audio import decode_segments

    info, segments = decode_segments(storage.read_bytes(uri), max_segment_seconds=MAX_CLIP_SECONDS)
    pcm = segments[0][1] if segments else np.zeros(0, np.int16)  # clips longer than the cap are truncated
    return _Clip(pcm, info.format, info.sample_rate, info.channels)


def frame_grid(seconds: float, hop: float = FRAME_HOP_SECONDS) -> np.ndarray:
    """Grid times (s) of the frame tasks: the centres of consecutive ``hop`` windows inside the clip."""
    return (np.arange(int(math.floor(seconds / hop + 1e-9))) + 0.5) * hop


# --------------------------------------------------------------------------- models


LayerFn = Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass
class _Extractor:
    name: str
    kind: str  # student | random_student | teacher | fbank
    frame_rate: float
    layers: list[Optional[int]]  # the layer numbers kept (1-based), [None] for single-output models
    fn: LayerFn  # (wavs [B, S], lengths [B]) -> (every layer [B, T, D], frames [B])
    info: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None


def _select_layers(num_layers: int, layers: Union[str, Sequence[int]]) -> list[int]:
    if layers == "all":
        return list(range(1, num_layers + 1))
    if layers == "last":
        return [num_layers]
    chosen = sorted({int(v) for v in layers})
    bad = [v for v in chosen if not 1 <= v <= num_layers]
    if bad or not chosen:
        raise ValueError(f"layers {list(layers)} out of range: the student has layers 1..{num_layers}")
    return chosen


def _student_extractor(name: str, model: Any, layers: Union[str, Sequence[int]], info: dict[str, Any]) -> _Extractor:
    keep = _select_layers(model.num_layers, layers)

    def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = model.features(wavs, lengths, autocast_dtype=torch.bfloat16)
        return [feats.layers[i - 1] for i in keep], feats.lengths.cpu()

    info = dict(info, num_layers=model.num_layers, layer_dims=model.layer_dims)
    return _Extractor(name, name, float(model.frame_rate), list(keep), fn, info)


def _random_student(config: Mapping[str, Any], device: torch.device):
    """A randomly initialised student (seed RANDOM_STUDENT_SEED) of the encoder ``config`` describes."""
    from spear.models.student import StudentModel, build_encoder, config_from_dict, encoder_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_STUDENT_SEED)
        if "size" in config:
            enc_cfg = encoder_config(config.get("architecture", "zipformer2"), config["size"],
                                     int(config.get("num_mel_bins", FBANK_BINS)))
        else:
            enc_cfg = config_from_dict(config)
        encoder = build_encoder(enc_cfg)
    return StudentModel(encoder).to(device).eval()


def _teacher_names(teachers: Sequence[Any]) -> list[str]:
    base = [f"teacher:{t.kind}" for t in teachers]
    names = []
    for t, b in zip(teachers, base):
        name = b + (f"@{t.layer}" if t.layer is not None and base.count(b) > 1 else "")
        k, unique = 2, name
        while unique in names:
            unique, k = f"{name}#{k}", k + 1
        names.append(unique)
    return names


# --------------------------------------------------------------------------- extraction


@dataclass
class _Features:
    pooled: list[np.ndarray]  # per kept layer: [num_items, D] float32 (rows of clips not run stay 0)
    frames: list[dict[int, np.ndarray]]  # per kept layer: item -> [grid points, D] float32


def _batches(order: list[int], lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Consecutive runs of ``order`` (sorted by length) whose padded size stays within ``max_samples``."""
    out, cur, longest = [], [], 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if cur and max(longest, n) * (len(cur) + 1) > max_samples:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def _extract(ex: _Extractor, clips: dict[int, _Clip], grids: dict[int, np.ndarray], num_items: int,
             device: torch.device, batch_seconds: float, log: Callable[[str], None]) -> _Features:
    """Run ``ex`` over every clip once: mean-pooled features per layer, plus the grid frames of
    the clips that frame tasks use (nothing else is kept: a clip's frames are dropped at once)."""
    from spear.stages.audio import pcm16_to_float

    ids = sorted(clips, key=lambda i: (len(clips[i].pcm), i))
    pooled: list[Optional[np.ndarray]] = [None] * len(ex.layers)
    frames: list[dict[int, np.ndarray]] = [{} for _ in ex.layers]
    lengths = {i: len(clips[i].pcm) for i in ids}
    batches = _batches(ids, lengths, int(batch_seconds * 16000))
    t0, done = time.monotonic(), 0
    for bi, batch in enumerate(batches):
        S = max(max(lengths[i] for i in batch), 1)
        wavs = torch.zeros(len(batch), S)
        for b, i in enumerate(batch):
            wavs[b, : lengths[i]] = torch.from_numpy(pcm16_to_float(clips[i].pcm))
        lens = torch.tensor([lengths[i] for i in batch], dtype=torch.long)
        with torch.inference_mode():
            outs, nf = ex.fn(wavs.to(device), lens.to(device))
        nf = nf.cpu().long()
        for li, y in enumerate(outs):
            y = y.float()
            T = y.shape[1]
            mask = (torch.arange(T, device=y.device)[None, :] < nf.to(y.device)[:, None]).unsqueeze(-1)
            sums = (y * mask).sum(1)
            means = (sums / nf.clamp_min(1).to(y.device)[:, None]).cpu().numpy().astype(np.float32)
            if pooled[li] is None:
                pooled[li] = np.zeros((num_items, y.shape[2]), np.float32)
            pooled[li][batch] = means
            for b, i in enumerate(batch):
                if i in grids:
                    n = int(nf[b])
                    if n == 0:
                        frames[li][i] = np.zeros((len(grids[i]), y.shape[2]), np.float32)
                        continue
                    idx = np.clip(np.floor(grids[i] * ex.frame_rate).astype(np.int64), 0, n - 1)
                    frames[li][i] = y[b, torch.from_numpy(idx).to(y.device)].cpu().numpy().astype(np.float32)
        done += sum(lengths[i] for i in batch)
        if bi == len(batches) - 1 or (bi + 1) % max(1, len(batches) // 4) == 0:
            el = time.monotonic() - t0
            log(f"[evaluate] {ex.name}: {done / 16000 / 60:.1f} min of audio in {el:.1f} s "
                f"({done / 16000 / max(el, 1e-9):.0f}x real time)")
    return _Features([p if p is not None else np.zeros((num_items, 1), np.float32) for p in pooled], frames)


# --------------------------------------------------------------------------- probing


def _task_data(task: Task, feats: _Features, li: int, grids: dict[int, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(x_train, y_train, x_test, y_test, groups_train, groups_test) of one layer."""
    if task.level == "utterance":
        x = feats.pooled[li][task.items]
        y = np.asarray(task.labels)
        tr = np.array([s == "train" for s in task.splits])
        return x[tr], y[tr], x[~tr], y[~tr], None, None
    xs, ys, gs, ss = [], [], [], []
    for i, spans, split in zip(task.items, task.intervals, task.splits):
        t = grids[i]
        if len(t) == 0:
            continue
        active = np.zeros(len(t), dtype=bool)
        for a, b in spans:
            active |= (t >= a) & (t < b)
        xs.append(feats.frames[li][i])
        ys.append(np.where(active, task.positive, task.negative))
        gs.append(np.full(len(t), i))
        ss.append(np.full(len(t), split == "train"))
    x, y, g, tr = np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), np.concatenate(ss)
    return x[tr], y[tr], x[~tr], y[~tr], g[tr], g[~tr]


def _task_label_counts(task: Task, grids: dict[int, np.ndarray]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    if task.level == "utterance":
        for lab, split in zip(task.labels, task.splits):
            counts[split][lab] = counts[split].get(lab, 0) + 1
    else:
        for i, spans, split in zip(task.items, task.intervals, task.splits):
            t = grids.get(i, np.zeros(0))
            active = np.zeros(len(t), dtype=bool)
            for a, b in spans:
                active |= (t >= a) & (t < b)
            for lab, n in ((task.positive, int(active.sum())), (task.negative, int((~active).sum()))):
                if n:
                    counts[split][lab] = counts[split].get(lab, 0) + n
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def _skip_reason(task: Task, counts: dict[str, dict[str, int]]) -> Optional[str]:
    if not task.items:
        return "no items"
    if len(counts["train"]) < 2:
        return f"training split has {len(counts['train'])} class(es); a probe needs 2"
    if not counts["test"]:
        return "empty test split"
    return None


# --------------------------------------------------------------------------- summary


@dataclass
class EvaluateSummary:
    """What `spear evaluate` did; ``to_dict()`` is the ``--json`` object and ``results.json``.

    ``probes``: one row per (task, model, layer): task, model, layer (1-based for students,
    None for teachers and fbank), score (mean test accuracy over seeds), metric, ci ([lo, hi],
    95 % bootstrap over test items), ci_method, macro_f1, seed_scores, l2 (chosen per seed),
    num_train, num_test, num_classes, chance, level.
    ``best``: ``{task: {model: {"layer", "score", "ci"}}}`` (the best layer of each model).
    """

    output: str
    report: str
    results_json: str
    probes: list[dict[str, Any]]
    best: dict[str, dict[str, dict[str, Any]]]
    tasks: list[dict[str, Any]]
    models: list[dict[str, Any]]
    corpus: dict[str, Any]
    seeds: list[int]
    skipped_tasks: list[dict[str, str]] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # report sections: training curves, codebooks
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        from spear.pipeline.report import format_results_table

        lines = [format_results_table(self), "", f"report: {self.report}", f"results: {self.results_json}"]
        if self.skipped_tasks:
            lines.append("skipped tasks: " + "; ".join(f"{s['task']} ({s['reason']})" for s in self.skipped_tasks))
        if self.skipped_files:
            lines.append(f"skipped {len(self.skipped_files)} unreadable file(s): "
                         + ", ".join(s["uri"] for s in self.skipped_files[:5]))
        return "\n".join(lines)


def _best(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cur = best.setdefault(r["task"], {}).get(r["model"])
        if cur is None or r["score"] > cur["score"]:
            best[r["task"]][r["model"]] = {"layer": r["layer"], "score": r["score"], "ci": r["ci"]}
    return best


def _corpus_summary(clips: dict[int, _Clip], items: _Items) -> dict[str, Any]:
    def group(key: Callable[[int], Any]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for i, c in clips.items():
            g = out.setdefault(str(key(i)), {"files": 0, "minutes": 0.0})
            g["files"] += 1
            g["minutes"] += c.seconds / 60
        return {k: {"files": v["files"], "minutes": round(v["minutes"], 3)} for k, v in sorted(out.items())}

    return {
        "files": len(clips),
        "minutes": round(sum(c.seconds for c in clips.values()) / 60, 3),
        "by_domain": group(lambda i: items.domains[i]),
        "by_format": group(lambda i: clips[i].format),
        "by_sample_rate": group(lambda i: clips[i].sample_rate),
        "by_channels": group(lambda i: clips[i].channels),
    }


# --------------------------------------------------------------------------- the job


def run_evaluate(student_dir: Optional[str], corpus_root: Optional[str], *, teachers: Sequence[Any] = (),
                 output: str, seeds: Sequence[int] = (0, 1, 2), manifests: Sequence[str] = (),
                 layers: Union[str, Sequence[int]] = "all", random_student: Union[bool, Mapping[str, Any]] = True,
                 fbank_floor: bool = True, tasks: Optional[Sequence[str]] = None,
                 l2_grid: Optional[Sequence[float]] = None, train_output: Optional[str] = None,
                 tokens_output: Optional[str] = None, storage: Optional[Storage] = None,
                 device: Optional[Union[str, torch.device]] = None, batch_seconds: float = 60.0,
                 num_threads: Optional[int] = None, progress: bool = True) -> EvaluateSummary:
    """Probe frozen features of a student, a random student, teachers and raw fbank; write a report.

    ``student_dir``: an exported student (None: no ``student`` rows). ``corpus_root``: a
    demo corpus (a folder with ``labels.jsonl``; None: manifests only). ``teachers``:
    TeacherConfigs (or mappings of their fields). ``manifests``: CSV/JSONL task files (see
    :func:`load_manifest_task`). ``layers``: "all", "last" or 1-based layer numbers of the
    students. ``random_student``: True for the student's own architecture (needs
    ``student_dir``), a mapping such as ``{"architecture": "zipformer2", "size": "tiny"}``
    to choose one, or False. ``tasks``: restrict to these task names. ``l2_grid``: the
    probe's L2 grid (default :data:`spear.models.probes.L2_GRID`). ``train_output`` /
    ``tokens_output``: a training output (loss curves) and a tokenize output (codebook usage)
    for the report. Features run on CUDA when present (students under bf16 autocast).
    ``num_threads``: torch CPU threads during the run (restored afterwards; None: leave as
    is). On a busy machine with few cores, 1 is often fastest: measured here (2 cores, load
    ~8), the tiny student ran 10x faster on one thread than on two.

    Returns an :class:`EvaluateSummary`; writes ``output/index.html``, its PNG plots and
    ``output/results.json``.
    """
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _run_evaluate(student_dir, corpus_root, teachers=teachers, output=output, seeds=seeds,
                             manifests=manifests, layers=layers, random_student=random_student,
                             fbank_floor=fbank_floor, tasks=tasks, l2_grid=l2_grid, train_output=train_output,
                             tokens_output=tokens_output, storage=storage, device=device,
                             batch_seconds=batch_seconds, progress=progress)
    finally:
        torch.set_num_threads(before)


def _run_evaluate(student_dir: Optional[str], corpus_root: Optional[str], *, teachers: Sequence[Any], output: str,
                  seeds: Sequence[int], manifests: Sequence[str], layers: Union[str, Sequence[int]],
                  random_student: Union[bool, Mapping[str, Any]], fbank_floor: bool, tasks: Optional[Sequence[str]],
                  l2_grid: Optional[Sequence[float]], train_output: Optional[str], tokens_output: Optional[str],
                  storage: Optional[Storage], device: Optional[Union[str, torch.device]], batch_seconds: float,
                  progress: bool) -> EvaluateSummary:
    from spear.models.probes import L2_GRID, run_probe
    from spear.pipeline.report import write_report

    t_start = time.monotonic()
    storage = storage or Storage()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run_evaluate needs at least one probe seed")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if corpus_root is None and not manifests:
        raise ValueError("nothing to evaluate on: give a corpus root (demo corpus) and/or manifests")
    if random_student is True and student_dir is None:
        raise ValueError("random_student=True needs student_dir (to copy its architecture); pass "
                         "random_student={'architecture': ..., 'size': ...} or False instead")

    # Tasks and their audio.
    items = _Items()
    all_tasks: list[Task] = []
    if corpus_root is not None:
        labels_uri = join_uri(corpus_root, "labels.jsonl")
        if not storage.exists(labels_uri):
            raise FileNotFoundError(f"{labels_uri} does not exist: corpus_root must be a demo corpus "
                                    "(generate one with `spear demo`) or use manifests")
        rows = [json.loads(line) for line in storage.read_text(labels_uri).splitlines() if line.strip()]
        all_tasks += demo_tasks(rows, corpus_root, items)
    for m in manifests:
        task = load_manifest_task(m, items, storage)
        taken = {t.name for t in all_tasks}
        name, k = task.name, 2
        while name in taken:
            name, k = f"{task.name}_{k}", k + 1
        task.name = name
        all_tasks.append(task)
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.name for t in all_tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available: {[t.name for t in all_tasks]}")
        all_tasks = [t for t in all_tasks if t.name in set(tasks)]
    needed = sorted({i for t in all_tasks for i in t.items})
    log(f"[evaluate] {len(all_tasks)} tasks over {len(needed)} files; decoding")
    clips: dict[int, _Clip] = {}
    skipped_files: list[dict[str, str]] = []
    for i in needed:
        try:
            clips[i] = _decode(items.uris[i], storage)
        except (OSError, ValueError, RuntimeError) as exc:  # AudioDecodeError is a ValueError
            skipped_files.append({"uri": items.uris[i], "reason": f"{type(exc).__name__}: {exc}"})
    all_tasks = [t.keep(lambda i: i in clips) for t in all_tasks]
    grids = {i: frame_grid(clips[i].seconds) for t in all_tasks if t.level == "frame" for i in t.items}

    # Which tasks can be probed.
    task_info, runnable, skipped_tasks = [], [], []
    for t in all_tasks:
        counts = _task_label_counts(t, grids)
        reason = _skip_reason(t, counts)
        task_info.append({"name": t.name, "level": t.level, "source": t.source, "description": t.description,
                          "files": len(t.items), "class_counts": counts, "skipped": reason})
        if reason:
            skipped_tasks.append({"task": t.name, "reason": reason})
            log(f"[evaluate] skipping task {t.name}: {reason}")
        else:
            runnable.append(t)

    # Models, loaded one at a time (only one model's features are in memory at once).
    specs: list[tuple[str, Callable[[], _Extractor]]] = []
    student_cfg: Optional[dict[str, Any]] = None
    if student_dir is not None:
        from spear.models.student import load_student

        def load_trained() -> _Extractor:
            model = load_student(student_dir, storage=storage, device=device)
            nonlocal student_cfg
            student_cfg = dict(model.config.get("encoder", {}))
            return _student_extractor("student", model, layers, {"path": str(student_dir),
                                                                 "metadata": model.config.get("metadata", {})})

        specs.append(("student", load_trained))
    if random_student:
        def load_random() -> _Extractor:
            if isinstance(random_student, Mapping):
                cfg = dict(random_student)
            else:
                assert student_cfg is not None  # the student loads first (checked above)
                cfg = student_cfg
            model = _random_student(cfg, device)
            return _student_extractor("random_student", model, layers,
                                      {"seed": RANDOM_STUDENT_SEED, "encoder": cfg})

        specs.append(("random_student", load_random))
    teacher_cfgs = []
    if teachers:
        from spear.config import TeacherConfig

        teacher_cfgs = [t if isinstance(t, TeacherConfig) else TeacherConfig.model_validate(dict(t)) for t in teachers]
    for name, tcfg in zip(_teacher_names(teacher_cfgs), teacher_cfgs):
        def load_teacher_ex(name: str = name, tcfg: Any = tcfg) -> _Extractor:
            from spear.models.teachers import load_teacher

            teacher = load_teacher(tcfg, storage=storage, device=device)

            def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
                out = teacher(wavs, lengths)
                return [out.embeddings], out.num_frames

            return _Extractor(name, "teacher", float(teacher.frame_rate), [None], fn,
                              {"kind": tcfg.kind, "layer": tcfg.layer, "dim": teacher.dim, "version": teacher.version})

        specs.append((name, load_teacher_ex))
    if fbank_floor:
        def load_fbank() -> _Extractor:
            from spear.models.frontend import KaldiFbank

            fbank = KaldiFbank(num_mel_bins=FBANK_BINS).to(device)

            def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
                feats, nf = fbank(wavs, lengths)
                return [feats], nf

            return _Extractor("fbank", "fbank", 100.0, [None], fn, {"settings": fbank.settings()})

        specs.append(("fbank", load_fbank))

    grid = tuple(l2_grid) if l2_grid is not None else L2_GRID
    probe_rows: list[dict[str, Any]] = []
    model_info: list[dict[str, Any]] = []
    for name, load in specs:
        t0 = time.monotonic()
        ex = load()
        feats = _extract(ex, clips, grids, len(items.uris), device, batch_seconds, log)
        del ex.fn
        t1 = time.monotonic()
        for t in runnable:
            for li, layer in enumerate(ex.layers):
                xtr, ytr, xte, yte, gtr, gte = _task_data(t, feats, li, grids)
                res = run_probe(xtr, ytr, xte, yte, seeds=seeds, l2_grid=grid, groups_train=gtr, groups_test=gte)
                probe_rows.append({"task": t.name, "model": name, "layer": layer, "level": t.level, **res.to_dict()})
        t2 = time.monotonic()
        dims = [int(p.shape[1]) for p in feats.pooled]
        del feats
        model_info.append({"name": name, "kind": ex.kind, "frame_rate": ex.frame_rate, "layers": ex.layers,
                           "dims": dims, "extract_seconds": round(t1 - t0, 3), "probe_seconds": round(t2 - t1, 3),
                           **ex.info})
        log(f"[evaluate] {name}: features {t1 - t0:.1f} s, {len(runnable)} tasks x {len(ex.layers)} layer(s) "
            f"probed in {t2 - t1:.1f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    summary = EvaluateSummary(
        output=str(output), report=join_uri(str(output), "index.html"),
        results_json=join_uri(str(output), "results.json"), probes=probe_rows, best=_best(probe_rows),
        tasks=task_info, models=model_info, corpus=_corpus_summary(clips, items), seeds=seeds,
        skipped_tasks=skipped_tasks, skipped_files=skipped_files)
    summary.wall_seconds = round(time.monotonic() - t_start, 3)
    write_report(summary, output, storage=storage, train_output=train_output, tokens_output=tokens_output)
    log(f"[evaluate] report: {summary.report}")
    return summary
