"""``spear export-tokens``: the live rows of a token version as Lhotse cuts, for icefall recipes.

Each live row (:mod:`spear.pipeline.ledger`: its object's latest ledger entry names its run)
becomes one Lhotse ``MonoCut``: id = the row's ``cut_id`` (a Lhotse source keeps its cut ids)
or else its segment id; start 0 and the row's duration; the row's 16 kHz mono audio as the
recording; one supervision spanning the cut with the row's ``speaker`` / ``language`` / ``text``
where the shards carry them; and per teacher role its MVQ indexes as a ``TemporalArray``
(uint8 [frames, codebooks], frame shift 1 / frame rate) under the field names the SPEAR
authors' icefall code reads (:mod:`spear.schemas.lhotse_export` says which and why).

Two layouts, written by Lhotse's own writers:

- ``lhotse-shar`` (default): Lhotse Shar shards under DEST, ``cuts.NNNNNN.jsonl.gz`` with
  ``recording.NNNNNN.tar`` (FLAC) and one ``<field>.NNNNNN.tar`` (.npy arrays) per teacher;
  read with ``CutSet.from_shar(in_dir=DEST)``.
- ``lhotse-cuts``: one ``DEST/cuts.jsonl.gz`` manifest whose recordings are the shards' FLAC
  segments copied to ``DEST/recordings/`` and whose arrays are .npy files under
  ``DEST/<field>/`` (Lhotse ``numpy_files`` storage), all named by absolute path or s3:// URL so
  the manifest reads from any working directory; read with ``CutSet.from_file``.

DEST is local (relative, ``~``) or ``s3://``: for S3, each shard is staged in a local temporary
folder and uploaded through :class:`~spear.cluster.storage.Storage` when it is complete, so
the credentials stay in the storage config. DEST must be empty or new.

Example::

    summary = run_export_tokens("out/tokens", "out/lhotse", fmt="lhotse-shar")
    print(summary.human())            # exported 1234 cuts (3.4 h) of tv-... to out/lhotse as Lhotse Shar ...
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.storage import Storage, StorageError, is_remote, join_uri, normalize_uri
from spear.pipeline.ledger import TokenStore, select_token_store
from spear.pipeline.progress import Progress
from spear.schemas.lhotse_export import (CUTS_MANIFEST, FORMATS, LHOTSE_EXPORT_VERSION, RECORDINGS_DIR, TASK_IDS,
                                         shar_fields, token_field)
from spear.schemas.shards import TEACHER_ROLES, decode_tokens

# nullable metadata columns a Lhotse source adds to segment rows (absent in older token versions)
_SUPERVISION_COLUMNS = ("speaker", "language", "text")


class ExportRequestError(ValueError):
    """An export that cannot be done as asked (unknown format, DEST not empty, bad shard size): one line."""


@dataclass
class ExportSummary:
    """What ``spear export-tokens`` wrote."""

    output: str
    dest: str
    format: str
    token_version: str
    cuts: int
    audio_seconds: float
    shards: int
    cuts_with_tokens: dict[str, int]            # teacher role -> cuts carrying its indexes
    fields: dict[str, str]                      # teacher role -> the custom field name
    frame_shifts: dict[str, float]              # teacher role -> seconds per frame
    renamed_ids: int = 0                        # rows whose cut id repeated (suffixed with the segment id)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        kind = {"lhotse-shar": "Lhotse Shar", "lhotse-cuts": "a Lhotse CutSet manifest"}[self.format]
        lines = [f"exported {self.cuts} cuts ({self.audio_seconds / 3600:.3f} h) of {self.token_version} "
                 f"to {self.dest} as {kind} ({self.shards} shards)"]
        for role, f in self.fields.items():
            lines.append(f"  {role} teacher: cut.{f} on {self.cuts_with_tokens.get(role, 0)} cuts, "
                         f"uint8 [frames, codebooks], frame_shift {self.frame_shifts[role]:g} s")
        if self.renamed_ids:
            lines.append(f"  {self.renamed_ids} repeated cut ids were made unique with the segment id")
        read = (f"CutSet.from_shar(in_dir={self.dest!r})" if self.format == "lhotse-shar"
                else f"CutSet.from_file({join_uri(self.dest, CUTS_MANIFEST)!r})")
        lines.append(f"  read with lhotse: {read}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- live rows


def iter_live_rows(store: TokenStore, columns: Optional[Sequence[str]] = None) -> Iterator[dict[str, Any]]:
    """The live rows of ``store``'s committed shards, one row group in memory at a time (shard file order)."""
    ledger = store.ledger()
    ledger = ledger.filter(pc.equal(ledger["status"], "tokenized"))
    live = pc.binary_join_element_wise(ledger["source_uri"], ledger["run_id"], "\x00")
    for uri in store.shard_files():
        fs, path = store.storage.filesystem(uri)
        try:
            fh = fs.open(path, "rb")
        except FileNotFoundError:
            raise StorageError(f"shard file {uri} of token version {store.version} is missing: the committed "
                               "manifest names it, so the dataset was changed or copied incompletely") from None
        with fh:
            pf = pq.ParquetFile(fh)
            present = set(pf.schema_arrow.names)
            cols = None if columns is None else [c for c in columns if c in present]
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g, columns=cols)
                keys = pc.binary_join_element_wise(t["source_uri"], t["run_id"], "\x00")
                t = t.filter(pc.is_in(keys, value_set=live))
                yield from t.to_pylist()


# --------------------------------------------------------------------------- rows -> cuts


def row_to_cut(row: dict[str, Any], teachers: dict[str, dict[str, Any]], token_version: str, cut_id: str,
               recording_source: Optional[tuple[str, str]] = None):
    """One live row as a Lhotse ``MonoCut`` whose recording and token arrays are in memory.

    ``recording_source`` (type, path) names a file or URL for the recording instead (``lhotse-cuts``).
    """
    from lhotse import MonoCut, Recording, SupervisionSegment
    from lhotse.audio import AudioSource

    rate = int(row["sample_rate"])
    num_samples = int(row["num_samples"])
    duration = num_samples / rate
    kind, source = recording_source or ("memory", row["audio"])
    recording = Recording(id=cut_id, sources=[AudioSource(type=kind, channels=[0], source=source)],
                          sampling_rate=rate, num_samples=num_samples, duration=duration)
    meta = {c: row.get(c) for c in _SUPERVISION_COLUMNS}
    supervision = SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration, channel=0,
                                     text=meta["text"], speaker=meta["speaker"], language=meta["language"])
    custom = {"task_id": TASK_IDS.get(row["domain"], 0), "domain": row["domain"],
              "spear_segment_id": row["segment_id"], "source_uri": row["source_uri"],
              "source_path": row.get("relative_path"),
              "source_offset": int(row["offset"]) / rate, "token_version": token_version,
              "spear_export": LHOTSE_EXPORT_VERSION}
    cut = MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, recording=recording,
                  supervisions=[supervision], custom=custom)
    for role, info in teachers.items():
        tokens = decode_tokens(row.get(f"{role}_tokens"), row.get(f"{role}_num_frames"),
                               row.get(f"{role}_num_codebooks"))
        if tokens is not None:
            cut = cut.attach_tensor(token_field(role), tokens, frame_shift=1.0 / float(info["frame_rate"]),
                                    temporal_dim=0)
    return cut


class _CutIds:
    """Unique cut ids: the row's ``cut_id`` (else its segment id); a repeat gets the segment id appended."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.renamed = 0

    def __call__(self, row: dict[str, Any]) -> str:
        cid = row.get("cut_id") or row["segment_id"]
        if cid in self.seen:
            cid = f"{cid}-{row['segment_id']}"
            self.renamed += 1
        self.seen.add(cid)
        return cid


# --------------------------------------------------------------------------- destinations


class _Destination:
    """Where the files go: DEST itself on local disk, or a local staging folder uploaded to S3 shard by shard."""

    def __init__(self, dest: str, storage: Storage):
        self.uri = normalize_uri(dest)
        self.storage = storage
        self.remote = is_remote(self.uri)
        if self.remote:
            storage.check_access(self.uri)
            if storage.exists(self.uri) and storage.list_files(self.uri):
                raise ExportRequestError(f"{dest} is not empty: export into a new or empty location "
                                         "(an interrupted export leaves its partial files: remove them)")
            self._tmp = tempfile.mkdtemp(prefix="spear-export-")
            self.local = self._tmp
        else:
            if os.path.exists(self.uri) and not os.path.isdir(self.uri):
                raise ExportRequestError(f"{dest} is a file: give a directory (new or empty) as DEST")
            if os.path.isdir(self.uri) and os.listdir(self.uri):
                raise ExportRequestError(f"{dest} is not empty: export into a new or empty location "
                                         "(an interrupted export leaves its partial files: remove them)")
            try:
                os.makedirs(self.uri, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {dest}: {exc.strerror or exc}") from None
            self.local = self.uri

    def final(self, local_path: str) -> str:
        """The URI a file staged at ``local_path`` ends up at."""
        rel = os.path.relpath(local_path, self.local).replace(os.sep, "/")
        return join_uri(self.uri, *rel.split("/"))

    def flush(self, keep: Sequence[str] = ()) -> None:
        """On S3: upload every staged file but those in ``keep`` (still being written) and remove it locally
        (local disk: the files are in place)."""
        if not self.remote:
            return
        for dirpath, _, names in os.walk(self.local):
            for name in sorted(names):
                p = os.path.join(dirpath, name)
                if p in keep:
                    continue
                with open(p, "rb") as f:
                    self.storage.write_bytes(self.final(p), f.read())
                os.remove(p)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self._tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the job


def run_export_tokens(output: str, dest: str, *, fmt: str = "lhotse-shar", version: Optional[str] = None,
                      shard_size: int = 1000, storage: Optional[Storage] = None,
                      progress: bool = True) -> ExportSummary:
    """Write the live rows of a token version at ``output`` to ``dest`` as Lhotse cuts (see the module docstring).

    ``version``: the token version (default: the only one; several -> a one-line error listing them).
    Raises :class:`ExportRequestError` for a request that cannot be done as asked, ``ConfigError`` for
    a missing or ambiguous token version and :class:`StorageError` for storage that cannot be read or written.
    """
    if fmt not in FORMATS:
        raise ExportRequestError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ExportRequestError(f"--shard-size must be at least 1 (got {shard_size})")
    storage = storage or Storage()
    storage.check_access(output, must_exist=True)
    store = select_token_store(output, storage, version, option="--version")
    teachers = {r: t for r, t in (store.version_info().get("teachers") or {}).items() if r in TEACHER_ROLES}
    destination = _Destination(dest, storage)
    try:
        return _export(store, teachers, destination, fmt, shard_size, progress, output)
    finally:
        destination.close()


def _export(store: TokenStore, teachers: dict[str, dict[str, Any]], destination: _Destination, fmt: str,
            shard_size: int, progress: bool, output: str) -> ExportSummary:
    from lhotse import CutSet

    ids = _CutIds()
    counts = {r: 0 for r in teachers}
    prog = Progress("export-tokens", enabled=progress)
    cuts = shards = 0
    seconds = 0.0
    files: list[str] = []
    writer = manifest = None
    manifest_path = os.path.join(destination.local, CUTS_MANIFEST)

    def close_shard() -> None:
        nonlocal writer, shards
        if writer is not None:
            files.extend(writer.close())
            writer = None
            shards += 1
            destination.flush(keep=[manifest_path])  # the manifest is written to the end

    try:
        if fmt == "lhotse-cuts":
            manifest = CutSet.open_writer(manifest_path)
        for row in iter_live_rows(store):
            if cuts % shard_size == 0:
                close_shard()
                writer = _ShardWriter(fmt, destination, shards, list(teachers))
            cid = ids(row)
            cut = writer.write(row, teachers, store.version, cid)
            if manifest is not None:
                manifest.write(cut)
            for r in teachers:
                counts[r] += int(cut.has_custom(token_field(r)))
            cuts += 1
            seconds += cut.duration
            prog.update(audio_seconds=cut.duration, cuts=1)
        close_shard()
    finally:
        if writer is not None:
            writer.close()
        if manifest is not None:
            manifest.close()
    if manifest is not None:
        destination.flush()
        files.append(destination.final(manifest_path))
    prog.finish()
    return ExportSummary(output=output, dest=destination.uri, format=fmt, token_version=store.version, cuts=cuts,
                         audio_seconds=seconds, shards=shards, cuts_with_tokens=counts,
                         fields={r: token_field(r) for r in teachers},
                         frame_shifts={r: 1.0 / float(t["frame_rate"]) for r, t in teachers.items()},
                         renamed_ids=ids.renamed, files=files)


class _ShardWriter:
    """One shard of the export: a Lhotse ``SharWriter`` (lhotse-shar), or the recordings and .npy arrays of
    up to ``shard_size`` cuts (lhotse-cuts)."""

    def __init__(self, fmt: str, destination: _Destination, index: int, roles: list[str]):
        self.fmt = fmt
        self.destination = destination
        self.index = index
        if fmt == "lhotse-shar":
            from lhotse.shar import SharWriter

            # one writer per shard (numbered as Lhotse numbers them) so a finished shard can be uploaded at once
            self.shar = SharWriter(destination.local, fields=shar_fields(roles), shard_size=None,
                                   shard_suffix=f".{index:06d}", warn_unused_fields=False)
            self.shar.__enter__()
        else:
            from lhotse.features.io import NumpyFilesWriter

            self.shar = None
            self.arrays = {r: NumpyFilesWriter(os.path.join(destination.local, token_field(r))) for r in roles}

    def write(self, row: dict[str, Any], teachers: dict[str, dict[str, Any]], token_version: str, cut_id: str):
        if self.shar is not None:
            cut = row_to_cut(row, teachers, token_version, cut_id)
            self.shar.write(cut)
            return cut
        return self._write_files(row, teachers, token_version, cut_id)

    def _write_files(self, row: dict[str, Any], teachers: dict[str, dict[str, Any]], token_version: str,
                     cut_id: str):
        from lhotse.utils import fastcopy

        d = self.destination
        name = f"{RECORDINGS_DIR}/{self.index:06d}/{row['segment_id']}.flac"
        local = os.path.join(d.local, *name.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(row["audio"])  # the shard's FLAC as is
        cut = row_to_cut(row, {}, token_version, cut_id,
                         recording_source=("url" if d.remote else "file", d.final(local)))
        custom = dict(cut.custom)
        for role, info in teachers.items():
            tokens = decode_tokens(row.get(f"{role}_tokens"), row.get(f"{role}_num_frames"),
                                   row.get(f"{role}_num_codebooks"))
            if tokens is None:
                continue
            w = self.arrays[role]
            arr = w.store_array(row["segment_id"], tokens,
                                frame_shift=1.0 / float(info["frame_rate"]), temporal_dim=0)
            # the manifest names the array where it ends up (S3 URL or absolute path), not the staging folder
            final_dir = d.final(w.storage_path)
            custom[token_field(role)] = fastcopy(arr, array=fastcopy(arr.array, storage_path=final_dir))
        return fastcopy(cut, custom=custom)

    def close(self) -> list[str]:
        """Finish the shard; the URIs of its Shar files (none for lhotse-cuts: the manifest names its files)."""
        if self.shar is None:
            return []
        self.shar.close()
        paths = [p for ps in self.shar.output_paths.values() for p in ps]
        self.shar = None
        return [self.destination.final(p) for p in paths]
