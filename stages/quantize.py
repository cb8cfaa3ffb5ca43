"""Quantise stage: pass 1 (sample teacher frames, fit MVQ codebooks) and the encode hook of pass 2.

Pass 1 decodes a seeded, source-balanced sample of the corpus, runs the teacher on it and
keeps a reservoir of frames (Algorithm R, exact uniform sample, bounded memory); segments
are split between fitting and held-out by a hash of their id, so a segment's frames are on
one side only. The codebooks are fitted where the GPUs are (a Ray task with a GPU when the
cluster has one) and saved as a versioned artefact.

Pass 2 plugs :class:`QuantizerEncoder` into :class:`~spear.stages.teacher.TeacherStage` as
its ``encode`` hook, so embeddings go from the teacher to the quantiser inside one actor and
never reach storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.cluster.storage import Storage, StorageOptions, join_uri

# torch (models.mvq, the artefact readers) is imported inside the functions that fit or encode: the
# tokenize job imports this module on the driver, where a run with nothing new never needs torch.

log = logging.getLogger(__name__)


class QuantizerEncoder:
    """Picklable encode hook: loads the MVQ artefact once per actor, encodes frames on their device."""

    def __init__(self, artefact_uri: str, storage_options: StorageOptions | None = None):
        self.artefact_uri = artefact_uri
        self.storage_options = storage_options
        self._q = None

    def __getstate__(self) -> dict:
        return {"artefact_uri": self.artefact_uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["artefact_uri"], state["storage_options"])

    @property
    def quantizer(self):
        if self._q is None:
            # imported in the actor: the tokenize job imports this module on the driver, where torch is not needed
            from spear.stages.artefacts import load_quantizer

            self._q = load_quantizer(self.artefact_uri, storage=Storage(self.storage_options))
        return self._q

    def __call__(self, frames):
        return self.quantizer.encode(frames)


class FrameReservoir:
    """A uniform sample of at most ``capacity`` frames of a stream, independent of arrival order.

    Each frame gets a pseudo-random key derived from (seed, segment id, frame index); the sample is
    the ``capacity`` frames with the smallest keys (a bottom-k sketch). Ray Data delivers batches in
    no fixed order, and this makes the sample, and so the fitted codebooks, the same on every run.
    Frames are buffered and merged in bulk, so the cost is amortised O(frames x dim).
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        self.capacity = int(capacity)
        self.dim = dim
        self.seed = seed
        self.seen = 0
        self._keys = np.zeros(0, dtype=np.float64)
        self._data = np.zeros((0, dim), dtype=np.float32)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def frame_keys(self, segment_id: str, n: int) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}\x00{segment_id}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "big")).random(n)

    def add(self, frames: np.ndarray, segment_id: str) -> None:
        n = frames.shape[0]
        if n == 0:
            return
        self.seen += n
        self._pending.append((self.frame_keys(segment_id, n), np.asarray(frames, dtype=np.float32)))
        self._pending_rows += n
        if self._pending_rows >= max(self.capacity, 4096):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
        data = np.concatenate([self._data] + [d for _, d in self._pending])
        self._pending, self._pending_rows = [], 0
        if keys.size > self.capacity:
            keep = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            keys, data = keys[keep], data[keep]
        self._keys, self._data = keys, data

    def sample(self) -> np.ndarray:
        """The sampled frames, ordered by key (a deterministic order)."""
        self._merge()
        order = np.argsort(self._keys, kind="stable")
        return self._data[order]


def is_heldout(segment_id: str, fraction: float) -> bool:
    """A fixed, hash-based split of segments into fitting and held-out."""
    h = int.from_bytes(hashlib.sha256(segment_id.encode()).digest()[:8], "big")
    return (h / 2 ** 64) < fraction


def balanced_sample(objects: pa.Table, seed: int, domains: Sequence[str] | None = None) -> pa.Table:
    """All objects (of ``domains``), in a seeded order that interleaves sources round-robin.

    Reading this order from the front gives a sample stratified by source (and so by domain).
    """
    if domains is not None:
        objects = objects.filter(pc.is_in(objects["domain"], value_set=pa.array(list(domains))))
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(objects["source"].to_pylist()):
        by_source.setdefault(s, []).append(i)
    queues = []
    for s in sorted(by_source):
        idx = np.array(by_source[s])
        rng.shuffle(idx)
        queues.append(list(idx))
    order: list[int] = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return objects.take(pa.array(order, type=pa.int64())) if order else objects


def settle_heldout(train: np.ndarray, heldout: np.ndarray, *, heldout_seen: int, seen: int,
                   fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The final (train, held-out) frames of a sample split by :func:`is_heldout`.

    The split is by segment, which is honest on a large corpus but blunt on a small one: of three
    segments, none or a whole third (not a tenth) may fall out. When the held-out segments took none
    or more than twice ``fraction`` of the frames seen, the frames go back together (train first, each
    part in its key order) and the last ``fraction`` of them is held out instead. Otherwise the split
    stands. Which segments fall out depends on their content hashes, so without this a few-segment
    corpus fitted or refused by chance.

    >>> t, h = np.zeros((48, 2), np.float32), np.ones((53, 2), np.float32)
    >>> [x.shape[0] for x in settle_heldout(t, h, heldout_seen=53, seen=101, fraction=0.1)]
    [91, 10]
    >>> [x.shape[0] for x in settle_heldout(t[:40], h[:5], heldout_seen=5, seen=45, fraction=0.1)]
    [40, 5]
    """
    if train.shape[0] + heldout.shape[0] < 2:
        return train, heldout
    if heldout.shape[0] and heldout_seen <= 2 * fraction * seen:
        return train, heldout
    frames = np.concatenate([train, heldout])
    n = max(1, int(round(frames.shape[0] * fraction)))
    return frames[:-n], frames[-n:]


@dataclass
class FrameSample:
    train: np.ndarray
    heldout: np.ndarray
    segments: int
    audio_seconds: float
    sources: dict[str, int]


# Frames per codebook entry for a sound k-means fit: faiss warns below 39 training points per
# centroid ("please provide at least 39*k"); we ask for 40.
SOUND_FRAMES_PER_ENTRY = 40


class TooFewFramesError(ValueError):
    """Fewer sampled frames than ``min_per_entry`` x ``codebook_size``: no fit is attempted."""

    def __init__(self, frames: int, codebook_size: int, min_per_entry: int):
        self.frames, self.codebook_size, self.min_per_entry = frames, codebook_size, min_per_entry
        self.needed = min_per_entry * codebook_size
        super().__init__(f"only {frames} frames sampled to fit {codebook_size}-entry codebooks "
                         f"(need at least {self.needed}: {min_per_entry} per entry)")


def largest_codebook_size(frames: int, per_entry: int) -> int | None:
    """The largest power-of-two codebook size (2..256) that ``frames`` fit at ``per_entry`` frames per entry."""
    k = 256
    while k >= 2 and frames < per_entry * k:
        k //= 2
    return k if k >= 2 else None


def fit_quantizer(sample: FrameSample, *, num_codebooks: int, codebook_size: int, seed: int, teacher_id: str,
                  layer: int | None, extra: dict[str, Any], min_frames_per_entry: int = 4, normalize: bool = True,
                  refine_iters: int = 4, kmeans_points_per_centroid: int = 256, kmeans_dim_steps: int = 10,
                  num_threads: int | None = None, log: Callable[[str], None] | None = None):
    """Fit MVQ on the sample (GPU when this process has one); the held-out loss is recorded in the artefact.

    ``normalize``: per-dimension mean/std normalisation of the frames before fitting (the teacher
    config's ``normalize_features``: the authors normalise WavLM's features, not Dasheng's); it is
    part of the codebooks' metadata and version. ``refine_iters``, ``kmeans_points_per_centroid``,
    ``kmeans_dim_steps``: the ``mvq`` settings of those names (the last two size the initialisation's
    k-means, most of a CPU fit's time). ``num_threads``: torch and faiss threads while fitting (default: every
    CPU this process may use, whatever torch was set to: the fit's floats follow the thread count, so a process
    left on one thread, a notebook or a test, would otherwise fit other codebooks than ``spear tokenize``
    on the same frames). ``log``: gets a line per initialised codebook and per refinement pass (a fit on CPU
    takes minutes).
    Raises :class:`TooFewFramesError` below ``min_frames_per_entry`` frames per codebook entry.
    """
    import torch

    from spear.models.device import process_cpus
    from spear.models.mvq import FitSettings, MultiCodebookQuantizer

    if sample.train.shape[0] < min_frames_per_entry * codebook_size:
        raise TooFewFramesError(int(sample.train.shape[0]), codebook_size, min_frames_per_entry)
    # frames from Ray's object store are read-only: torch wants writable arrays (copied only when not)
    train = torch.from_numpy(np.require(sample.train, requirements="W"))
    heldout = torch.from_numpy(np.require(sample.heldout, requirements="W")) if sample.heldout.shape[0] else None
    settings = FitSettings(num_codebooks=num_codebooks, codebook_size=codebook_size, seed=seed, normalize=normalize,
                           refine_iters=refine_iters, max_points_per_centroid=kmeans_points_per_centroid,
                           progressive_dim_steps=kmeans_dim_steps, num_threads=num_threads or process_cpus())
    if sample.train.shape[0] <= 2 * sample.train.shape[1]:
        # faiss' progressive-dimension k-means starts with a PCA that needs more frames than dimensions
        settings = dataclasses.replace(settings, progressive_dim_steps=0)
    return MultiCodebookQuantizer.fit(train, settings, heldout=heldout,
                                      teacher_id=teacher_id, layer=layer, extra=extra, log=log)


def fit_quantizer_task(sample: FrameSample, **kwargs: Any):
    """:func:`fit_quantizer` as a GPU Ray task runs it: the quantiser comes back on the CPU.

    A CUDA tensor pickles through ``torch.save`` and unpickles with ``torch.load`` in the caller,
    which fails where the caller has no CUDA (a cluster's head node without GPUs: "Attempting to
    deserialize object on a CUDA device"). The held-out loss is already in the metadata.
    """
    return fit_quantizer(sample, **kwargs).to("cpu")


def codebook_uri(output: str, role: str, teacher_version: str, num_codebooks: int, codebook_size: int,
                 normalize: bool = True) -> str:
    """Where the codebooks of one teacher version, codebook shape and normalisation live under ``output``.

    Codebooks fitted on raw (not normalised) embeddings get a ``-raw`` suffix, so they never share a
    folder with normalised ones; normalised ones keep the folder name they always had.

    >>> codebook_uri("/o", "audio", "ab" * 10, 8, 256, normalize=False)
    '/o/codebooks/audio-abababababababab-8x256-raw'
    """
    name = f"{role}-{teacher_version[:16]}-{num_codebooks}x{codebook_size}" + ("" if normalize else "-raw")
    return join_uri(output, "codebooks", name)
