"""Lhotse corpora as sources: one catalog row per cut, decoded as exactly that cut.

A corpus source may be a Lhotse CutSet manifest (``cuts.jsonl.gz``, ``.jsonl``, ``.json``,
``.yaml``: any form ``CutSet.from_file`` reads) or a Lhotse Shar directory (``cuts.NNNNNN.jsonl.gz``
beside ``recording.NNNNNN.tar``), on local disk or S3. ``SourceConfig.format`` says which, or
``auto`` tells them from the path (:func:`source_format`). Lhotse parses its own formats: this
module fetches bytes through :class:`~spear.cluster.storage.Storage` (S3 objects into a local
file first) and hands Lhotse a local path.

What a cut becomes:

- **Listing** (:func:`list_cuts`): one catalog row per cut (:data:`~spear.schemas.catalog.CATALOG_SCHEMA`),
  read lazily from JSONL (a line at a time) into Arrow record batches of :data:`LIST_CHUNK_ROWS` cuts
  (a million cuts cost their Arrow columns, not Python objects), repeated ids set aside afterwards
  (:func:`drop_duplicate_cuts`),
  keyed ``lhotse-cut:<cut id>`` whichever manifest lists it, so a new manifest holding known cuts
  redoes only the new or changed ones. Its etag hashes what the cut takes from its recording
  (audio location, offset, duration, channels): changing any of them re-tokenises the cut and
  supersedes its old rows. The supervisions give ``speaker`` and ``language`` (the first one's)
  and ``text`` (all texts joined with a space).
- **Decoding** (:func:`decode_cut_rows`): just the cut's range and channels of the recording,
  averaged to mono when the cut names several channels (a MultiCut, or a recording whose
  source holds only the cut's channels), resampled to 16 kHz. Cuts of one recording are decoded
  from one read of it (the decode planner keeps them in one task, :func:`plan_cut_blocks`).
- **One cut, one segment.** The manifest's cuts are never re-segmented. A cut longer than
  ``decode.max_segment_seconds`` is quarantined, not split: a split would hand the teachers and
  the Lhotse export several pieces under one cut id, with token arrays that no longer line up with
  the cut's duration (icefall reads one array per cut); the reason says to raise the limit or
  window the manifest (``cuts.cut_into_windows``).

Set aside with a reason, the rest of the run going on: at listing, MixedCut / PaddingCut (several
recordings or padding: unsupported), cuts without a recording, recordings with audio transforms
other than Resample (speed or volume perturbation, reverberation: unsupported), recordings read through a shell
command, from memory or a non-S3 URL (unsupported), duplicate cut ids (the second and later);
at decode (and then recorded in the ledger, like an undecodable file), a missing or unreadable
recording, an offset past its end, a cut longer than ``max_segment_seconds`` or shorter than
``min_segment_seconds``.

Relative audio paths in a local manifest resolve as Lhotse resolves them (against the working
directory of the run that lists it); in an S3 manifest, against the manifest's folder.

Example::

    >>> from spear.config import SourceConfig
    >>> source_format(SourceConfig(uri="data/cuts.jsonl.gz", domain="speech"))
    'lhotse-cuts'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import PurePosixPath
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.cluster.storage import Storage, StorageError, is_absolute_uri, join_uri, normalize_uri, split_uri
from spear.config import DecodeConfig
from spear.schemas.catalog import CATALOG_SCHEMA, CUT_URI_PREFIX, cut_uri
from spear.schemas.quarantine import QuarantineRecord, quarantine_record
from spear.schemas.segments import segment_id
from spear.stages.audio import AudioDecodeError, flac_encode, read_cut_audio

#: The catalog columns only cut rows fill.
CUT_COLUMNS = CATALOG_SCHEMA.names[7:]

#: What ``CutSet.from_file`` reads: a name whose suffixes hold one of these (Lhotse's own test).
MANIFEST_SUFFIXES = (".jsonl", ".json", ".yaml")

_SHAR_CUTS = re.compile(r"^cuts\.(\d+)\.jsonl(\.gz)?$")
_SHAR_RECORDING = re.compile(r"^recording\.(\d+)\.tar$")

# Cuts of one recording per decode task at most (objects_per_task x this): a cut is usually much shorter
# than a whole file, and a task reads each recording (or Shar shard) it touches once.
CUTS_PER_OBJECT = 16


def is_cut_uri(uri: str) -> bool:
    return uri.startswith(CUT_URI_PREFIX)


def is_manifest_name(uri: str) -> bool:
    """Whether ``uri`` names a file Lhotse reads as a manifest (by its suffixes, as Lhotse decides).

    >>> is_manifest_name("s3://b/cuts.jsonl.gz"), is_manifest_name("/data/speech")
    (True, False)
    """
    suffixes = PurePosixPath(uri.rstrip("/").rsplit("/", 1)[-1]).suffixes
    return any(s in MANIFEST_SUFFIXES for s in suffixes)


def source_format(src: Any, storage: Optional[Storage] = None) -> str:
    """``files``, ``lhotse-cuts`` or ``lhotse-shar`` for a :class:`~spear.config.SourceConfig`.

    ``auto`` (the default) decides from the path: a manifest file name (:func:`is_manifest_name`) is a
    CutSet, a folder holding ``cuts.000000.jsonl[.gz]`` is Shar (one existence check), anything else a
    folder of audio files.
    """
    fmt = getattr(src, "format", "auto") or "auto"
    if fmt != "auto":
        return fmt
    if is_manifest_name(src.uri):
        return "lhotse-cuts"
    if storage is not None:
        for name in ("cuts.000000.jsonl.gz", "cuts.000000.jsonl"):
            if storage.exists(join_uri(normalize_uri(src.uri), name)):
                return "lhotse-shar"
    return "files"


# ----------------------------------------------------------------------------------------------- listing


class LocalCopies:
    """Local paths for manifest and shard objects: local files as they are, S3 objects fetched through
    Storage into a private folder, the ``capacity`` most recent kept (the others deleted)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.dir: Optional[str] = None
        self.files: OrderedDict[str, str] = OrderedDict()

    def path(self, uri: str, storage: Storage) -> str:
        scheme, path = split_uri(uri)
        if scheme == "file":
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            return path
        if uri in self.files:
            self.files.move_to_end(uri)
            return self.files[uri]
        data = storage.read_bytes(uri)
        if self.dir is None or not os.path.isdir(self.dir):
            self.dir = tempfile.mkdtemp(prefix="spear-lhotse-")
        sub = tempfile.mkdtemp(dir=self.dir)
        local = os.path.join(sub, uri.rsplit("/", 1)[-1])  # the name keeps its suffixes: Lhotse reads by them
        with open(local, "wb") as f:
            f.write(data)
        self.files[uri] = local
        while len(self.files) > self.capacity:
            _, old = self.files.popitem(last=False)
            shutil.rmtree(os.path.dirname(old), ignore_errors=True)
        return local

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir, self.files = None, OrderedDict()


# One per worker process: a decode task reading cuts of a Shar shard another task of this process read.
_WORKER_COPIES = LocalCopies(capacity=4)


def _resolve_audio(location: str, manifest_uri: str) -> str:
    """A recording's audio path as Lhotse would open it: absolute ones and URIs as given; relative ones against
    the working directory for a local manifest (Lhotse's rule), against the manifest's folder for an S3 one."""
    if not is_absolute_uri(location) and split_uri(manifest_uri)[0] == "s3":
        return join_uri(manifest_uri.rsplit("/", 1)[0], *location.split("/"))
    return normalize_uri(location)


def is_shar_shard(audio_uri: str) -> bool:
    """Whether a cut's audio is a Shar recording shard (``recording.NNNNNN.tar``) rather than an audio file."""
    return bool(_SHAR_RECORDING.match(audio_uri.rsplit("/", 1)[-1]))


def cut_row(cut: Any, manifest_uri: str, shar_tar: Optional[str], supported: tuple, resolved: dict) -> tuple:
    """What one cut puts in its catalog row, as :data:`_PER_CUT` values; raises ValueError with the reason when the
    cut cannot be tokenised. ``supported``: the cut classes tokenised; ``resolved``: audio locations resolved so
    far (a recording's many cuts resolve it once)."""
    if not isinstance(cut, supported):
        raise ValueError(f"unsupported cut type {type(cut).__name__}: only MonoCut and MultiCut "
                         f"(one recording, no mixing or padding) are tokenised")
    rec = cut.recording
    if rec is None:
        raise ValueError("the cut has no recording (only features or custom data)")
    if rec.transforms:
        changes = [t.get("name") if isinstance(t, dict) else type(t).__name__ for t in rec.transforms]
        changes = [name for name in changes if name != "Resample"]  # decoding resamples to 16 kHz anyway
        if changes:
            raise ValueError(f"recording {rec.id} has audio transforms {changes}: unsupported (only Resample)")
    ch = cut.channel
    wanted = list(ch) if isinstance(ch, (list, tuple)) else [int(ch)]
    for source in rec.sources:
        have = source.channels
        if all(c in have for c in wanted):
            break
    else:
        raise ValueError(f"channels {wanted} are spread over several audio sources of recording {rec.id}: unsupported")
    if shar_tar is not None:
        audio_uri, location = shar_tar, f"{shar_tar.rsplit('/', 1)[-1]}/{rec.id}"
    else:
        raw = source.source
        known = (source.type, raw) if isinstance(raw, str) else None   # not a memory source's bytes as a key
        audio_uri = resolved.get(known) if known else None
        if audio_uri is None:
            if not (source.type == "file" or (source.type == "url" and str(raw).startswith(("s3://", "file://")))):
                what = "a shell command" if source.type == "command" else f"a {source.type} source"
                raise ValueError(f"recording {rec.id} is read through {what}: unsupported (use files or s3:// URLs)")
            if len(resolved) > _RESOLVED_KEPT:
                resolved.clear()    # one file per cut (clips): keep the cache small, a recording's cuts are adjacent
            audio_uri = resolved[known] = _resolve_audio(str(raw), manifest_uri)
        location = audio_uri
    have = list(have)
    positions = [have.index(c) for c in wanted]
    channels = None if positions == list(range(len(have))) else positions
    start, duration = float(cut.start), float(cut.duration)
    # What the cut takes from its recording: a change in any of these re-tokenises the cut (the ledger's etag:
    # keep this exact form, ``json.dumps([location, have, round(start, 6), round(duration, 6), wanted])``, or every
    # cut of every corpus would be tokenised again). Written out here with the recording's part cached: json.dumps
    # was a third of a cut's listing time; it writes a finite float as repr() and an int as str().
    r_start, r_duration = round(start, 6), round(duration, 6)
    if math.isfinite(r_start) and math.isfinite(r_duration) and all(type(c) is int for c in wanted + have):
        head = resolved.get((location, *have)) if shar_tar is None else None
        if head is None:
            head = json.dumps([location, have])[:-1]
            if shar_tar is None:
                resolved[(location, *have)] = head
        key = f"{head}, {r_start!r}, {r_duration!r}, [{', '.join(map(str, wanted))}]]"
    else:
        key = json.dumps([location, have, r_start, r_duration, wanted])
    speaker = language = text = None
    sups = cut.supervisions
    if sups:
        speaker, language = sups[0].speaker, sups[0].language
        texts = [s.text for s in sups if s.text]
        text = " ".join(texts) if texts else None
    return (cut.id, audio_uri, int(round(duration * 16000)) * 2, hashlib.sha256(key.encode()).hexdigest()[:32],
            start, duration, channels, speaker, language, text)


# Audio locations (and their etag key prefixes) remembered while listing one manifest, at most.
_RESOLVED_KEPT = 4096

#: The catalog columns a cut's own values fill (:func:`cut_row`'s order); ``uri`` comes from ``cut_id``,
#: ``relative_path`` is ``audio_uri``, and ``source``, ``domain``, ``mtime`` and ``cut_manifest`` are its manifest's.
_PER_CUT = ("cut_id", "audio_uri", "size", "etag", "cut_start", "cut_duration", "cut_channels", "speaker",
            "language", "text")

#: Cuts per Arrow record batch while listing: the Python values of at most this many cuts are alive at once.
LIST_CHUNK_ROWS = 65536


def _cut_batch(cols: list[list], src: Any, manifest_uri: str, mtime: float) -> pa.RecordBatch:
    """One CATALOG_SCHEMA record batch from the :data:`_PER_CUT` value lists of some cuts of one manifest."""
    n = len(cols[0])
    arrays = {name: pa.array(values, CATALOG_SCHEMA.field(name).type) for name, values in zip(_PER_CUT, cols)}
    arrays["uri"] = pc.binary_join_element_wise(CUT_URI_PREFIX, arrays["cut_id"], "")
    arrays["relative_path"] = arrays["audio_uri"]      # the same buffers: a cut's path is its recording's
    for name, value in (("source", src.source_name), ("domain", src.domain), ("mtime", mtime),
                        ("cut_manifest", manifest_uri)):
        arrays[name] = pa.repeat(pa.scalar(value, CATALOG_SCHEMA.field(name).type), n)
    return pa.RecordBatch.from_arrays([arrays[name] for name in CATALOG_SCHEMA.names], schema=CATALOG_SCHEMA)


def _manifests(src: Any, fmt: str, storage: Storage) -> list[tuple[str, Optional[str], float]]:
    """(manifest URI, Shar recording shard URI or None, mtime) per manifest of a source."""
    uri = normalize_uri(src.uri)
    if fmt == "lhotse-cuts":
        entries = storage.list_files(uri)
        if len(entries) != 1 or entries[0].uri != uri and split_uri(entries[0].uri)[1] != split_uri(uri)[1]:
            raise StorageError(f"{src.uri} is not a single manifest file")
        return [(uri, None, entries[0].mtime)]
    entries = storage.list_files(uri)
    cuts, tars = {}, {}
    for e in entries:
        name = e.uri.rsplit("/", 1)[-1]
        if m := _SHAR_CUTS.match(name):
            cuts[m.group(1)] = e
        elif m := _SHAR_RECORDING.match(name):
            tars[m.group(1)] = e.uri
    if not cuts:
        raise StorageError(f"{src.uri} holds no Lhotse Shar cuts shards (cuts.NNNNNN.jsonl.gz)")
    if not tars:
        raise StorageError(f"{src.uri} holds no Lhotse Shar recording shards (recording.NNNNNN.tar): no audio to read")
    out = []
    for idx in sorted(cuts):
        if idx not in tars:
            raise StorageError(f"Shar shard {cuts[idx].uri} has no recording.{idx}.tar beside it")
        out.append((cuts[idx].uri, tars[idx], cuts[idx].mtime))
    return out


def iter_manifest_cuts(local_path: str, shar: bool) -> Iterator[Any]:
    """The cuts of one manifest file, parsed by Lhotse: lazily (one line at a time) for JSONL, gzipped or not, and
    Shar cuts shards; a ``.json`` or ``.yaml`` manifest is read whole (Lhotse has no lazy reader for them)."""
    from lhotse import CutSet  # Lhotse is needed only when a source is a Lhotse manifest

    if shar or ".jsonl" in PurePosixPath(local_path).suffixes:
        return iter(CutSet.from_jsonl_lazy(local_path))
    cuts = CutSet.from_file(local_path)
    return iter(cuts if cuts is not None else [])


def list_cuts(src: Any, storage: Storage) -> tuple[pa.Table, list[QuarantineRecord]]:
    """The catalog rows (CATALOG_SCHEMA) of every cut of a Lhotse source, and the cuts and manifests set aside
    (stage ``catalog``). Manifests are read lazily and the rows kept as Arrow record batches of
    :data:`LIST_CHUNK_ROWS` cuts, so a manifest of millions of cuts costs its Arrow columns, not a Python object
    per value. A manifest that fails part way (a damaged line) lists none of its cuts. Duplicate cut ids are
    left for :func:`drop_duplicate_cuts` (they may span sources)."""
    batches: list[pa.RecordBatch] = []
    bad: list[QuarantineRecord] = []
    fmt = source_format(src, storage)

    def reject(uri: str, reason: str) -> None:
        bad.append(quarantine_record({"uri": uri, "source": src.source_name, "domain": src.domain, "etag": ""},
                                     "catalog", reason))

    if split_uri(src.uri)[0] == "s3":
        storage.check_access(src.uri)  # unreachable endpoint / bad credentials: fail fast, as for file sources
    try:
        manifests = _manifests(src, fmt, storage)
    except StorageError as exc:
        reject(src.uri, f"unreadable Lhotse source: {exc}")
        return CATALOG_SCHEMA.empty_table(), bad
    from lhotse.cut import MonoCut, MultiCut  # Lhotse is needed only when a source is a Lhotse manifest

    supported = (MonoCut, MultiCut)
    copies = LocalCopies(capacity=1)
    try:
        for manifest_uri, tar, mtime in manifests:
            resolved: dict = {}
            mine: list[pa.RecordBatch] = []     # this manifest's rows: dropped if it fails part way
            cols: list[list] = [[] for _ in _PER_CUT]
            appends = [c.append for c in cols]
            n_bad = len(bad)
            try:
                local = copies.path(manifest_uri, storage)
                for cut in iter_manifest_cuts(local, shar=tar is not None):
                    try:
                        row = cut_row(cut, manifest_uri, tar, supported, resolved)
                    except (ValueError, AttributeError) as exc:
                        reject(cut_uri(cut.id), f"{exc} (in {manifest_uri})")
                        continue
                    for append, value in zip(appends, row):
                        append(value)
                    if len(cols[0]) >= LIST_CHUNK_ROWS:
                        mine.append(_cut_batch(cols, src, manifest_uri, mtime))
                        for c in cols:
                            c.clear()
                if cols[0]:
                    mine.append(_cut_batch(cols, src, manifest_uri, mtime))
                batches.extend(mine)
            except (FileNotFoundError, StorageError, OSError) as exc:
                del bad[n_bad:]
                reject(manifest_uri, f"unreadable manifest: {exc}")
            except Exception as exc:  # whatever Lhotse raises on a file that is not a CutSet manifest
                del bad[n_bad:]
                reject(manifest_uri, f"not a Lhotse CutSet manifest ({type(exc).__name__}: {exc})")
    finally:
        copies.close()
    return pa.Table.from_batches(batches, schema=CATALOG_SCHEMA), bad


def drop_duplicate_cuts(objects: pa.Table) -> tuple[pa.Table, list[QuarantineRecord]]:
    """``objects`` without the second and later rows of a ``uri`` (a cut id listed again: the first listed wins),
    and those rows as quarantine records (stage ``catalog``).

    Finds repeats by sorting 64-bit hashes of the keys (read a chunk at a time) and compares the strings only
    where hashes meet: a million cuts cost a few arrays of integers, not a set of a million strings or Arrow's
    hash table of them (``count_distinct`` holds a copy of every key).

    >>> t = pa.table({"uri": ["lhotse-cut:a", "lhotse-cut:b", "lhotse-cut:a"], "cut_id": ["a", "b", "a"],
    ...               "source": ["m"] * 3, "domain": ["speech"] * 3, "cut_manifest": ["x", "x", "y"]})
    >>> kept, bad = drop_duplicate_cuts(t)
    >>> kept["uri"].to_pylist(), [q["reason"] for q in bad]
    (['lhotse-cut:a', 'lhotse-cut:b'], ["duplicate cut id 'a' in y: an earlier cut has it"])
    """
    n = objects.num_rows
    if n < 2:
        return objects, []
    hashes = np.empty(n, dtype=np.int64)
    at = 0
    for chunk in objects["uri"].chunks:
        k = len(chunk)
        hashes[at:at + k] = np.fromiter(map(hash, chunk.to_pylist()), dtype=np.int64, count=k)
        at += k
    order = np.argsort(hashes, kind="stable")          # equal hashes keep their listing order
    h = hashes[order]
    meet = np.flatnonzero(h[1:] == h[:-1])
    if meet.size == 0:
        return objects, []
    involved = np.zeros(n, dtype=bool)                  # sorted positions whose hash another row shares
    involved[meet] = involved[meet + 1] = True
    groups: dict[int, list[int]] = {}
    for pos in np.flatnonzero(involved).tolist():
        groups.setdefault(int(h[pos]), []).append(int(order[pos]))
    uris = objects["uri"]
    later: list[int] = []
    for rows in groups.values():
        first: set[str] = set()
        for r in sorted(rows):                          # the same hash: compare the keys themselves
            key = uris[r].as_py()
            if key in first:
                later.append(r)
            first.add(key)
    if not later:
        return objects, []
    dups = objects.select(["uri", "source", "domain", "cut_id", "cut_manifest"]).take(pa.array(sorted(later)))
    bad = [quarantine_record({"uri": r["uri"], "source": r["source"], "domain": r["domain"], "etag": ""}, "catalog",
                             f"duplicate cut id {r['cut_id']!r} in {r['cut_manifest']}: an earlier cut has it")
           for r in dups.to_pylist()]
    keep = np.ones(n, dtype=bool)
    keep[later] = False
    return objects.filter(pa.array(keep)), bad


# ----------------------------------------------------------------------------------------------- planning


def _run_starts(keys: pa.ChunkedArray) -> np.ndarray:
    """Row numbers where ``keys`` differs from the row before (row 0 always)."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if len(keys) < 2:
        return np.zeros(min(len(keys), 1), dtype=np.int64)
    differs = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).fill_null(True)
    return np.r_[0, np.flatnonzero(differs.to_numpy(zero_copy_only=False)) + 1]


def _ascending_in_runs(values: pa.ChunkedArray, starts: np.ndarray) -> bool:
    """Whether ``values`` never decreases within a run (runs begin at ``starts``)."""
    v = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    falls = np.flatnonzero(v[1:] < v[:-1]) + 1
    return bool(np.isin(falls, starts).all())


def plan_cut_blocks(cuts: pa.Table, objects_per_task: int, min_blocks: int) -> list[pa.Table]:
    """Decode tasks over cut rows, each a run of at most ``per_task`` cuts sorted by audio then start, where
    ``per_task`` is ``objects_per_task * CUTS_PER_OBJECT`` or less to make ``min_blocks`` tasks. A recording's
    cuts stay in one task (one read of its audio) unless they are more than ``per_task``: then in as few
    tasks as that allows.

    >>> t = pa.table({"audio_uri": ["b", "a", "b", "a", "c"], "cut_start": [1.0, 0.0, 0.0, 2.0, 0.0],
    ...               "uri": list("vwxyz")})
    >>> [b["uri"].to_pylist() for b in plan_cut_blocks(t, objects_per_task=1, min_blocks=2)]
    [['w', 'y'], ['x', 'v', 'z']]
    """
    n = cuts.num_rows
    if n == 0:
        return []
    # Runs of one recording, found in Arrow (no Python string per cut). A manifest usually lists a recording's
    # cuts together and in time order: then the rows are used as they are (the blocks are slices of ``cuts``,
    # not of a sorted copy of every column).
    ordered = cuts
    starts = _run_starts(cuts["audio_uri"])
    if len(starts) != pc.count_distinct(cuts["audio_uri"]).as_py() or not _ascending_in_runs(cuts["cut_start"], starts):
        ordered = cuts.sort_by([("audio_uri", "ascending"), ("cut_start", "ascending")])
        starts = _run_starts(ordered["audio_uri"])
    per_task = max(1, min(objects_per_task * CUTS_PER_OBJECT, -(-n // max(1, min_blocks))))
    ends = np.r_[starts[1:], n]
    spans: list[tuple[int, int]] = []          # (first row, rows) of each task, contiguous in ``ordered``
    first, rows = 0, 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        for c in range(s, e, per_task):        # a recording with more cuts than per_task: in per_task chunks
            size = min(per_task, e - c)
            if rows and rows + size > per_task:
                spans.append((first, rows))
                rows = 0
            if rows == 0:
                first = c
            rows += size
    if rows:
        spans.append((first, rows))
    return [ordered.slice(a, k) for a, k in spans]


# ----------------------------------------------------------------------------------------------- decoding


def _append(cols: dict[str, list], row: Mapping[str, Any]) -> None:
    for name in cols:
        cols[name].append(row.get(name))


def _quarantine(cols: dict[str, list], obj: Mapping[str, Any], stage: str, reason: str) -> None:
    _append(cols, {"segment_id": "", "source": obj["source"], "source_uri": obj["uri"],
                   "relative_path": obj["relative_path"], "source_etag": obj["etag"], "source_size": int(obj["size"]),
                   "content_sha256": "", "domain": obj["domain"], "offset": 0, "num_samples": 0, "duration": 0.0,
                   "sample_rate": 0, "source_sample_rate": 0, "source_channels": 0, "source_format": "",
                   "object_segments": 0, "quarantine_stage": stage, "quarantine_reason": reason,
                   "cut_id": obj["cut_id"], "speaker": obj["speaker"], "language": obj["language"], "text": obj["text"]})


def decode_cut(obj: Mapping[str, Any], audio: str | bytes, cfg: DecodeConfig, cols: dict[str, list]) -> None:
    """Append the one segment of cut ``obj`` (a catalog row) read from ``audio`` (a local path or the
    encoded bytes of its recording), or its quarantine row, to ``cols`` (DECODED_SCHEMA columns)."""
    try:
        info, pcm = read_cut_audio(audio, obj["cut_start"], obj["cut_duration"], obj["cut_channels"],
                                   target_rate=cfg.sample_rate)
    except AudioDecodeError as exc:
        _quarantine(cols, obj, "decode", exc.reason)
        return
    if pcm.size < max(1, cfg.min_segment_seconds * cfg.sample_rate):
        _quarantine(cols, obj, "decode", f"cut is {pcm.size / cfg.sample_rate:.3f} s, shorter than "
                                         f"decode.min_segment_seconds={cfg.min_segment_seconds:g}")
        return
    sha = hashlib.sha256(pcm.tobytes()).hexdigest()
    offset = int(round(float(obj["cut_start"]) * cfg.sample_rate))
    _append(cols, {"segment_id": segment_id(obj["source"], obj["cut_id"], sha, offset), "source": obj["source"],
                   "source_uri": obj["uri"], "relative_path": obj["relative_path"], "source_etag": obj["etag"],
                   "source_size": int(obj["size"]), "content_sha256": sha, "domain": obj["domain"], "offset": offset,
                   "num_samples": int(pcm.size), "duration": pcm.size / cfg.sample_rate, "sample_rate": cfg.sample_rate,
                   "audio": flac_encode(pcm, cfg.sample_rate, cfg.flac_compression),
                   "source_sample_rate": info.sample_rate, "source_channels": info.channels,
                   "source_format": info.format, "object_segments": 1, "quarantine_stage": None,
                   "quarantine_reason": None, "cut_id": obj["cut_id"], "speaker": obj["speaker"],
                   "language": obj["language"], "text": obj["text"]})


def _shar_audio(tar_uri: str, cuts_uri: str, wanted: set[str], storage: Storage) -> dict[str, bytes]:
    """Encoded audio of the ``wanted`` cuts of one Shar shard, read by Lhotse's own Shar reader."""
    from lhotse import CutSet

    fields = {"cuts": [_WORKER_COPIES.path(cuts_uri, storage)], "recording": [_WORKER_COPIES.path(tar_uri, storage)]}
    out = {}
    for cut in CutSet.from_shar(fields=fields):
        if cut.id in wanted and cut.recording is not None and cut.recording.sources:
            data = cut.recording.sources[0].source
            if isinstance(data, (bytes, bytearray)):
                out[cut.id] = bytes(data)
    return out


def decode_cut_rows(rows: list[Mapping[str, Any]], storage: Storage, cfg: DecodeConfig, cols: dict[str, list]) -> None:
    """Decode the cut rows of one task: each recording (or Shar shard) is read once for all its cuts here."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for obj in rows:
        groups.setdefault(obj["audio_uri"], []).append(obj)
    for audio_uri, group in groups.items():
        todo = []
        for obj in group:
            if obj["cut_duration"] > cfg.max_segment_seconds:
                _quarantine(cols, obj, "decode",
                            f"cut is {obj['cut_duration']:.3f} s, longer than decode.max_segment_seconds="
                            f"{cfg.max_segment_seconds:g}: cuts are tokenised whole, never split; raise the limit "
                            f"or window the manifest (lhotse CutSet.cut_into_windows)")
            else:
                todo.append(obj)
        if not todo:
            continue
        try:
            if is_shar_shard(audio_uri):
                members = _shar_audio(audio_uri, todo[0]["cut_manifest"], {o["cut_id"] for o in todo}, storage)
                for obj in todo:
                    if obj["cut_id"] in members:
                        decode_cut(obj, members[obj["cut_id"]], cfg, cols)
                    else:
                        _quarantine(cols, obj, "read", f"no audio for the cut in Shar shard {audio_uri}")
                continue
            scheme, path = split_uri(audio_uri)
            if scheme == "file":
                if not os.path.isfile(path):
                    raise FileNotFoundError(path)
                audio: str | bytes = path  # soundfile seeks in a local file: only the cuts' ranges are read
            else:
                audio = storage.read_bytes(audio_uri)
        except FileNotFoundError:
            for obj in todo:
                _quarantine(cols, obj, "read", f"recording audio missing: {audio_uri}")
            continue
        except Exception as exc:  # storage errors, or Lhotse failing on a damaged Shar shard
            for obj in todo:
                _quarantine(cols, obj, "read", f"recording unreadable: {audio_uri}: {type(exc).__name__}: {exc}")
            continue
        for obj in todo:
            decode_cut(obj, audio, cfg, cols)


def cut_rows_mask(objects: pa.Table) -> Optional[np.ndarray]:
    """Which catalog rows are cuts (None when the table has no cut column or no cut)."""
    if "cut_id" not in objects.column_names or objects["cut_id"].null_count == objects.num_rows:
        return None
    return np.asarray(objects["cut_id"].is_valid())
