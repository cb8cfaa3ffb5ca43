"""The decode job (`spear decode`): catalog -> decode -> Parquet segment files + quarantine table.

Output layout under ``output`` (:mod:`spear.schemas.decode_record`)::

    segments/part-*.parquet   16 kHz FLAC segments (schema: spear.schemas.segments.SEGMENT_SCHEMA)
    quarantine.parquet        objects that were skipped, with the stage and reason
    decode.json               the commit record: summary and the list of part files (relative to ``output``)

``decode.json`` is written last: a run that dies leaves no decode.json and readers
(:func:`read_segments`) see nothing half-done.

Example::

    from spear.config import load_config
    cfg = load_config(None, ["output=/tmp/out", "corpus.sources=[{uri: /data/wavs, domain: speech}]"])
    summary = run_decode(cfg)
    print(summary.segments, summary.audio_seconds)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from spear.cluster.ray_runtime import ray_data_without_progress_bars, ray_session
from spear.cluster.storage import (Storage, StorageError, StorageOptions, find_recorded, join_uri, normalize_uri,
                                   relative_uri, resolve_uri)
from spear.config import ConfigError, SpearConfig
from spear.pipeline.progress import Progress
from spear.schemas.decode_record import DECODE_RECORD_NAME, QUARANTINE_NAME, SEGMENTS_DIR, DecodeRecord
from spear.schemas.quarantine import QuarantineRecord, is_partial, quarantine_table
from spear.schemas.segments import CUT_METADATA_COLUMNS, SEGMENT_SCHEMA
from spear.schemas.shards import with_cut_metadata
from spear.stages.catalog import Catalog, build_catalog
from spear.stages.decode import decode_dataset
from spear.stages.writer import WRITER_CPUS, ObjectTracker, WriterStage, parquet_bytes


@dataclass
class DecodeSummary:
    """What `spear decode` did; ``to_dict()`` is the ``--json`` object."""

    objects: int                      # objects listed (good and bad)
    decoded_objects: int
    segments: int
    audio_seconds: float
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    output: str = ""
    files: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0         # the whole job: listing, Ray start-up, decoding, commit
    ray_start_seconds: float = 0.0    # starting (or connecting to) Ray
    decode_seconds: float = 0.0       # from Ray ready to the last segment written

    @property
    def realtime_factor(self) -> float:
        """Audio seconds per wall second of the whole job."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def decode_realtime_factor(self) -> float:
        """Audio seconds per wall second of decoding alone (Ray up, listing and commit excluded)."""
        return self.audio_seconds / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def partial(self) -> list[QuarantineRecord]:
        """Objects kept in part (truncated or damaged): their segments are in the output."""
        return [q for q in self.quarantined if is_partial(q)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("files")
        d["quarantined"] = [{"uri": q["uri"], "reason": q["reason"], "stage": q["stage"],
                             "kept_seconds": q.get("kept_seconds")} for q in self.quarantined]
        d["partial_objects"] = len(self.partial)
        d["audio_hours"] = self.audio_seconds / 3600
        d["realtime_factor"] = self.realtime_factor
        d["decode_realtime_factor"] = self.decode_realtime_factor
        return d

    def human(self) -> str:
        """The summary for people; every figure in it is one of ``to_dict()``'s."""
        d = self.to_dict()
        lines = [f"decoded {d['decoded_objects']}/{d['objects']} objects into {d['segments']} segments, "
                 f"{_audio(d)} of audio in {d['wall_seconds']:.1f} s ({_times(d['realtime_factor'])} real time; "
                 f"Ray start-up {d['ray_start_seconds']:.1f} s, decoding alone {d['decode_seconds']:.1f} s = "
                 f"{_times(d['decode_realtime_factor'])} real time)", f"output: {d['output']}"]
        partial = [q for q in d["quarantined"] if is_partial(q)]
        dropped = [q for q in d["quarantined"] if not is_partial(q)]
        if partial:
            lines.append(f"kept in part {len(partial)} (their decodable part is in the output):")
            lines += [f"  {q['uri']}: {q['reason']}" for q in partial]
        if dropped:
            lines.append(f"quarantined {len(dropped)}:")
            lines += [f"  {q['uri']}: {q['reason']}" for q in dropped]
        return "\n".join(lines)


def _audio(d: dict[str, Any]) -> str:
    """Hours once there is an hour of it, else seconds (a short run is not "0.000 h")."""
    return f"{d['audio_hours']:.3f} h" if d["audio_hours"] >= 1 else f"{d['audio_seconds']:.1f} s"


def _times(factor: float) -> str:
    """A real-time factor as people read it: 0.79x, 3.20x, 41x (never a rounded 0x or 1x)."""
    return f"{factor:.2f}x" if factor < 10 else f"{factor:.0f}x"


def _check_sources(cfg: SpearConfig) -> None:
    if not cfg.corpus.sources:
        raise ConfigError("no corpus sources: give --input URI[,URI...] --domain speech|audio, "
                          "or list corpus.sources in the config")


def run_decode(cfg: SpearConfig, *, overwrite: bool = False, progress: bool = True,
               catalog: Catalog | None = None) -> DecodeSummary:
    """Run the decode job described by ``cfg`` (corpus.sources, decode.*, output, storage, ray).

    ``catalog`` replaces the listing of ``cfg.corpus.sources`` (e.g. only the new objects of a corpus).
    """
    _check_sources(cfg)
    t0 = time.monotonic()
    options = StorageOptions.from_config(cfg.storage)
    storage = Storage(options)
    out = normalize_uri(cfg.output)  # workers run in another directory: they get the absolute spelling
    record_uri = join_uri(out, DECODE_RECORD_NAME)
    segments_dir = join_uri(out, SEGMENTS_DIR)

    storage.check_access(out)  # unreachable storage or bad credentials: fail before any work
    if storage.exists(record_uri):
        if not overwrite:
            raise StorageError(f"{out} already holds a decode result ({DECODE_RECORD_NAME}); "
                               "use --overwrite or another --output")
        storage.delete(record_uri)
    storage.delete(segments_dir, recursive=True)  # leftovers of an earlier, uncommitted run

    if catalog is None:
        catalog = build_catalog(cfg.corpus.sources, storage)
    if catalog.num_objects == 0 and catalog.unreadable:
        raise StorageError("no source could be listed: " + "; ".join(f"{u['uri']}: {u['reason']}" for u in catalog.unreadable))

    tracker = ObjectTracker()
    with ray_session(cfg.ray, dashboard=False) as rinfo:  # Ray Data only: no dashboard (see ray_runtime)
        t_ready = time.monotonic()
        meter = Progress("decode", enabled=progress)
        meter.start = t0  # the same clock as the summary's realtime_factor: one definition of "x real time"
        ray_data_without_progress_bars()
        ds = decode_dataset(catalog.objects, cfg.decode, options)
        ds = ds.map_batches(WriterStage(segments_dir, SEGMENT_SCHEMA, options), batch_format="pyarrow",
                            batch_size=cfg.decode.segments_per_file, num_cpus=WRITER_CPUS)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                meter.update(audio_seconds=row["audio_seconds"], **tracker.add(row))
        t_done = time.monotonic()
    # No closing progress line: the totals are the summary's (printed by the caller, or --json).

    kept = {o["uri"]: o["audio_seconds"] for o in tracker.completed}
    quarantined = list(catalog.unreadable) + [dict(q, kept_seconds=kept.get(q["uri"])) if is_partial(q) else q
                                              for q in tracker.quarantined]
    quarantined.sort(key=lambda q: q["uri"])
    storage.write_bytes(join_uri(out, QUARANTINE_NAME), parquet_bytes(quarantine_table(quarantined)))
    summary = DecodeSummary(objects=catalog.num_objects + len(catalog.unreadable),
                            decoded_objects=tracker.completed_total, segments=tracker.rows,
                            audio_seconds=tracker.audio_seconds, quarantined=quarantined, output=cfg.output,
                            files=sorted(f["file"] for f in tracker.files), ray_start_seconds=rinfo.start_seconds,
                            decode_seconds=t_done - t_ready, wall_seconds=time.monotonic() - t0)
    names = sorted(_relative_name(out, f) for f in summary.files)
    record = DecodeRecord(files=names, summary=summary.to_dict(), decode_config=cfg.decode.model_dump(mode="json"),
                          sources=[s.model_dump(mode="json") for s in cfg.corpus.sources])
    storage.write_text(record_uri, record.to_json())
    return summary


def _relative_name(root: str, uri: str) -> str:
    rel = relative_uri(root, uri)
    if rel is None:
        raise StorageError(f"segment file {uri} is not inside the decode output {root}")
    return rel


def read_decode_record(output: str, storage: Storage | None = None) -> DecodeRecord:
    """The commit record (``decode.json``) of a decode output, with ``files`` resolved to URIs under ``output``."""
    storage = storage or Storage()
    root = normalize_uri(output)
    record_uri = join_uri(root, DECODE_RECORD_NAME)
    if not storage.exists(record_uri):
        raise StorageError(f"{output} has no committed decode result ({DECODE_RECORD_NAME} missing)")
    record = DecodeRecord.from_json(storage.read_text(record_uri), where=record_uri)
    if record.record_version >= 2:
        record.files = [resolve_uri(root, f) for f in record.files]
    else:
        record.files = [_resolve_legacy(root, f, storage) for f in record.files]
    return record


def _resolve_legacy(root: str, name: str, storage: Storage) -> str:
    """A part file named by a version-1 record (absolute, or relative to the writer's working directory)."""
    found = find_recorded(storage, join_uri(root, SEGMENTS_DIR), name, f"{SEGMENTS_DIR}/")
    if found is not None:
        return found
    raise StorageError(f"{join_uri(root, DECODE_RECORD_NAME)} (written by an older spear) names {name}, found neither "
                       f"under {root}/segments/ nor at that path: copy the whole decode output folder, or re-run "
                       "`spear decode --overwrite`")


def read_segments(output: str, storage: Storage | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed segments of a decode output, sorted by segment id."""
    storage = storage or Storage()
    record = read_decode_record(output, storage)
    import pyarrow.parquet as pq

    tables = []
    for f in record.files:
        data = storage.read_bytes(f)
        # segments written before Lhotse sources lack the cut metadata columns: read as nulls
        names = set(pq.read_schema(pa.BufferReader(data)).names) if columns is not None else set()
        present = None if columns is None else [c for c in columns if c in names or c not in CUT_METADATA_COLUMNS]
        tables.append(with_cut_metadata(pq.read_table(pa.BufferReader(data), columns=present), columns))
    if not tables:
        schema = SEGMENT_SCHEMA if columns is None else pa.schema([SEGMENT_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    if "segment_id" in table.column_names:
        table = table.sort_by("segment_id")
    return table


def read_quarantine(output: str, storage: Storage | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    storage = storage or Storage()
    return pq.read_table(pa.BufferReader(storage.read_bytes(join_uri(normalize_uri(output), QUARANTINE_NAME))))
