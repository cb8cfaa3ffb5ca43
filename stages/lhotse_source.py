"""Lhotse corpora as sources: one catalog row per cut, decoded as exactly that cut.

A corpus source may be a Lhotse CutSet manifest (``cuts.jsonl.gz``, ``.jsonl``, ``.json``,
``.yaml``: any form ``CutSet.from_file`` reads) or a Lhotse Shar directory (``cuts.NNNNNN.jsonl.gz``
beside ``recording.NNNNNN.tar``), on local disk or S3. ``SourceConfig.format`` says which, or
``auto`` tells them from the path (:func:`source_format`). Lhotse parses its own formats: this
module fetches bytes through :class:`~spear.cluster.storage.Storage` (S3 objects into a local
file first) and hands Lhotse a local path.

What a cut becomes:

- **Listing** (:func:`list_cuts`): one catalog row per cut (:data:`~spear.schemas.catalog.CATALOG_SCHEMA`)
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
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import PurePosixPath
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import pyarrow as pa

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


class _LocalCopies:
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
_WORKER_COPIES = _LocalCopies(capacity=4)


def _cut_metadata(cut: Any) -> dict[str, Optional[str]]:
    sups = list(getattr(cut, "supervisions", None) or [])
    texts = [s.text for s in sups if s.text]
    return {"speaker": sups[0].speaker if sups else None, "language": sups[0].language if sups else None,
            "text": " ".join(texts) if texts else None}


def _wanted_channels(cut: Any) -> list[int]:
    ch = cut.channel
    return list(ch) if isinstance(ch, (list, tuple)) else [int(ch)]


def _resolve_audio(location: str, manifest_uri: str) -> str:
    """A recording's audio path as Lhotse would open it: absolute ones and URIs as given; relative ones against
    the working directory for a local manifest (Lhotse's rule), against the manifest's folder for an S3 one."""
    if not is_absolute_uri(location) and split_uri(manifest_uri)[0] == "s3":
        return join_uri(manifest_uri.rsplit("/", 1)[0], *location.split("/"))
    return normalize_uri(location)


def is_shar_shard(audio_uri: str) -> bool:
    """Whether a cut's audio is a Shar recording shard (``recording.NNNNNN.tar``) rather than an audio file."""
    return bool(_SHAR_RECORDING.match(audio_uri.rsplit("/", 1)[-1]))


def _cut_row(cut: Any, src: Any, manifest_uri: str, shar_tar: Optional[str], mtime: float, supported: tuple,
             resolved: dict[str, str]) -> tuple:
    """The catalog row of one cut (values in CATALOG_SCHEMA's order); raises ValueError with the reason when the cut cannot be tokenised.
    ``supported``: the cut classes tokenised; ``resolved``: audio locations resolved so far (a recording's
    many cuts resolve it once)."""
    if not isinstance(cut, supported):
        raise ValueError(f"unsupported cut type {type(cut).__name__}: only MonoCut and MultiCut "
                         f"(one recording, no mixing or padding) are tokenised")
    rec = cut.recording
    if rec is None:
        raise ValueError("the cut has no recording (only features or custom data)")
    changes = [t.get("name") if isinstance(t, dict) else type(t).__name__ for t in (rec.transforms or [])]
    changes = [name for name in changes if name != "Resample"]  # decoding resamples to 16 kHz anyway
    if changes:
        raise ValueError(f"recording {rec.id} has audio transforms {changes}: unsupported (only Resample)")
    wanted = _wanted_channels(cut)
    holders = [s for s in rec.sources if set(wanted) <= set(s.channels)]
    if not holders:
        raise ValueError(f"channels {wanted} are spread over several audio sources of recording {rec.id}: unsupported")
    source = holders[0]
    if shar_tar is not None:
        audio_uri, location = shar_tar, f"{shar_tar.rsplit('/', 1)[-1]}/{rec.id}"
    elif source.type == "file" or (source.type == "url" and str(source.source).startswith(("s3://", "file://"))):
        raw = str(source.source)
        if raw not in resolved:
            resolved[raw] = _resolve_audio(raw, manifest_uri)
        audio_uri = location = resolved[raw]
    else:
        what = "a shell command" if source.type == "command" else f"a {source.type} source"
        raise ValueError(f"recording {rec.id} is read through {what}: unsupported (use files or s3:// URLs)")
    positions = [list(source.channels).index(c) for c in wanted]
    channels = None if positions == list(range(len(source.channels))) else positions
    # What the cut takes from its recording: a change in any of these re-tokenises the cut.
    key = json.dumps([location, source.channels, round(float(cut.start), 6), round(float(cut.duration), 6), wanted])
    duration = float(cut.duration)
    meta = _cut_metadata(cut)
    # in CATALOG_SCHEMA's order (a million cuts list column by column, without a dict per row)
    return (cut_uri(cut.id), src.source_name, audio_uri, src.domain, int(round(duration * 16000)) * 2,
            hashlib.sha256(key.encode()).hexdigest()[:32], mtime, cut.id, audio_uri, manifest_uri, float(cut.start),
            duration, channels, meta["speaker"], meta["language"], meta["text"])


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
    """The cuts of one manifest file (lazily for JSONL), parsed by Lhotse."""
    from lhotse import CutSet  # Lhotse is needed only when a source is a Lhotse manifest

    cuts = CutSet.from_jsonl_lazy(local_path) if shar else CutSet.from_file(local_path)
    return iter(cuts if cuts is not None else [])


def list_cuts(src: Any, storage: Storage, seen: Optional[set[str]] = None
              ) -> tuple[dict[str, list], list[QuarantineRecord]]:
    """Catalog columns (CATALOG_SCHEMA names -> lists) of every cut of a Lhotse source, and the cuts and
    manifests set aside (stage ``catalog``). ``seen``: catalog keys listed so far (updated): a cut id seen
    before is a duplicate."""
    seen = set() if seen is None else seen
    rows: dict[str, list] = {name: [] for name in CATALOG_SCHEMA.names}
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
        return rows, bad
    from lhotse.cut import MonoCut, MultiCut  # Lhotse is needed only when a source is a Lhotse manifest
    appends = [rows[name].append for name in CATALOG_SCHEMA.names]

    copies = _LocalCopies(capacity=1)
    try:
        for manifest_uri, tar, mtime in manifests:
            resolved: dict[str, str] = {}
            try:
                local = copies.path(manifest_uri, storage)
                for cut in iter_manifest_cuts(local, shar=tar is not None):
                    key = cut_uri(cut.id)
                    if key in seen:
                        reject(key, f"duplicate cut id {cut.id!r} in {manifest_uri}: an earlier cut has it")
                        continue
                    try:
                        row = _cut_row(cut, src, manifest_uri, tar, mtime, (MonoCut, MultiCut), resolved)
                    except (ValueError, AttributeError) as exc:
                        reject(key, f"{exc} (in {manifest_uri})")
                        continue
                    seen.add(key)
                    for append, value in zip(appends, row):
                        append(value)
            except (FileNotFoundError, StorageError, OSError) as exc:
                reject(manifest_uri, f"unreadable manifest: {exc}")
            except Exception as exc:  # whatever Lhotse raises on a file that is not a CutSet manifest
                reject(manifest_uri, f"not a Lhotse CutSet manifest ({type(exc).__name__}: {exc})")
    finally:
        copies.close()
    return rows, bad


# ----------------------------------------------------------------------------------------------- planning


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
    ordered = cuts.sort_by([("audio_uri", "ascending"), ("cut_start", "ascending")])
    per_task = max(1, min(objects_per_task * CUTS_PER_OBJECT, -(-n // max(1, min_blocks))))
    keys = ordered["audio_uri"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
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
