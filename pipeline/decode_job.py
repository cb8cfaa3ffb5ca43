"""The decode job (`spear decode`): catalog -> decode -> Parquet segment files + quarantine table.

Output layout under ``output``::

    segments/part-*.parquet   16 kHz FLAC segments (schema: spear.schemas.segments.SEGMENT_SCHEMA)
    quarantine.parquet        objects that were skipped, with the stage and reason
    decode.json               the commit record: summary and the list of part files

``decode.json`` is written last: a run that dies leaves no decode.json and readers
(:func:`read_segments`) see nothing half-done.

Example::

    from spear.pipeline.config import load_config
    cfg = load_config(None, ["output=/tmp/out", "corpus.sources=[{uri: /data/wavs, domain: speech}]"])
    summary = run_decode(cfg)
    print(summary.segments, summary.audio_seconds)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageError, StorageOptions, join_uri
from spear.pipeline.config import ConfigError, SpearConfig
from spear.pipeline.progress import Progress
from spear.schemas.segments import QUARANTINE_SCHEMA, SEGMENT_SCHEMA, SEGMENTS_SCHEMA_VERSION
from spear.stages.catalog import Catalog, build_catalog
from spear.stages.decode import decode_dataset
from spear.stages.writer import ObjectTracker, parquet_bytes, write_batch

MANIFEST_NAME = "decode.json"


@dataclass
class DecodeSummary:
    """What `spear decode` did; ``to_dict()`` is the ``--json`` object."""

    objects: int                      # objects listed (good and bad)
    decoded_objects: int
    segments: int
    audio_seconds: float
    quarantined: list[dict] = field(default_factory=list)  # {"uri", "reason", "stage", ...}
    output: str = ""
    files: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("files")
        d["quarantined"] = [{"uri": q["uri"], "reason": q["reason"], "stage": q["stage"]} for q in self.quarantined]
        d["audio_hours"] = self.audio_seconds / 3600
        d["realtime_factor"] = self.realtime_factor
        return d


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
    out = cfg.output
    manifest_uri = join_uri(out, MANIFEST_NAME)
    segments_dir = join_uri(out, "segments")

    storage.check_access(out)  # unreachable storage or bad credentials: fail before any work
    if storage.exists(manifest_uri):
        if not overwrite:
            raise StorageError(f"{out} already holds a decode result ({MANIFEST_NAME}); "
                               "use --overwrite or another --output")
        storage.delete(manifest_uri)
    storage.delete(segments_dir, recursive=True)  # leftovers of an earlier, uncommitted run

    if catalog is None:
        catalog = build_catalog(cfg.corpus.sources, storage)
    if catalog.num_objects == 0 and catalog.unreadable:
        raise StorageError("no source could be listed: " + "; ".join(f"{u['uri']}: {u['reason']}" for u in catalog.unreadable))

    tracker = ObjectTracker()
    with ray_session(cfg.ray):
        import ray

        meter = Progress("decode", enabled=progress)  # after Ray is up: throughput of decoding alone
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = decode_dataset(catalog.objects, cfg.decode, options)
        ds = ds.map_batches(write_batch, batch_format="pyarrow", batch_size=cfg.decode.segments_per_file,
                            fn_kwargs={"directory": segments_dir, "storage_options": options, "schema": SEGMENT_SCHEMA},
                            num_cpus=0.25)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                meter.update(audio_seconds=row["audio_seconds"], **tracker.add(row))
    meter.finish()

    quarantined = list(catalog.unreadable) + tracker.quarantined
    quarantined.sort(key=lambda q: q["uri"])
    qtable = pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA)
    storage.write_bytes(join_uri(out, "quarantine.parquet"), parquet_bytes(qtable))
    summary = DecodeSummary(objects=catalog.num_objects + len(catalog.unreadable),
                            decoded_objects=tracker.completed_total, segments=tracker.rows,
                            audio_seconds=tracker.audio_seconds, quarantined=quarantined, output=out,
                            files=sorted(f["file"] for f in tracker.files), wall_seconds=time.monotonic() - t0)
    manifest = {"kind": "spear.decode", "schema_version": SEGMENTS_SCHEMA_VERSION, "files": summary.files,
                "summary": summary.to_dict(), "decode_config": cfg.decode.model_dump(mode="json"),
                "sources": [s.model_dump(mode="json") for s in cfg.corpus.sources]}
    storage.write_text(manifest_uri, json.dumps(manifest, indent=1))
    return summary


def read_segments(output: str, storage: Storage | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed segments of a decode output, sorted by segment id."""
    storage = storage or Storage()
    manifest_uri = join_uri(output, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        raise StorageError(f"{output} has no committed decode result ({MANIFEST_NAME} missing)")
    manifest = json.loads(storage.read_text(manifest_uri))
    import pyarrow.parquet as pq

    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(f)), columns=columns) for f in manifest["files"]]
    if not tables:
        schema = SEGMENT_SCHEMA if columns is None else pa.schema([SEGMENT_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    table = pa.concat_tables(tables)
    if "segment_id" in table.column_names:
        table = table.sort_by("segment_id")
    return table


def read_quarantine(output: str, storage: Storage | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    storage = storage or Storage()
    return pq.read_table(pa.BufferReader(storage.read_bytes(join_uri(output, "quarantine.parquet"))))
