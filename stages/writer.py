"""Writer stage: batches of rows -> Parquet files on any storage, with one summary row per file.

Files are written whole through :meth:`Storage.write_bytes` (atomic on local disk, a single
PUT on S3), so a reader never sees half a file. Binary payload columns (FLAC audio, token
bytes) are stored without dictionary encoding or compression: they are incompressible and
read back at memory speed.

The summary row (:data:`~spear.schemas.write_summary.WRITE_SUMMARY`) tells the driver which
objects the file holds and how many of each object's segments (``object_segments`` says how
many there are in all), so the driver can commit an object once all of its segments are on
storage (:class:`ObjectTracker`), and collects quarantined objects.

Example::

    writer = WriterStage(directory="/out/segments", schema=SEGMENT_SCHEMA, storage_options=options)
    summaries = decoded.map_batches(writer, batch_format="pyarrow", batch_size=64, num_cpus=WRITER_CPUS)
    tracker = ObjectTracker()
    for row in summaries.iter_rows():
        tracker.add(row)
"""

from __future__ import annotations

import io
import uuid
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.storage import StorageOptions, cached_storage, join_uri
from spear.schemas.quarantine import QuarantineRecord, is_partial
from spear.schemas.shards import with_cut_metadata
from spear.schemas.write_summary import WrittenObject, quarantine_records, summary_table, written_objects

UNCOMPRESSED_COLUMNS = ("audio",)

#: CPU reservation of a writer task: it mostly waits on storage.
WRITER_CPUS = 0.25


def parquet_bytes(table: pa.Table, *, raw_columns: Sequence[str] = UNCOMPRESSED_COLUMNS,
                  row_group_size: int = 256) -> bytes:
    """Serialise ``table`` to Parquet: zstd for metadata columns, raw bytes for payload columns."""
    raw = [c for c in table.column_names if c in raw_columns or c.endswith("_tokens")]
    compression = {c: ("none" if c in raw else "zstd") for c in table.column_names}
    dictionary = [c for c in table.column_names if c not in raw and pa.types.is_string(table.schema.field(c).type)]
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, use_dictionary=dictionary, row_group_size=row_group_size,
                   write_statistics=[c for c in table.column_names if c not in raw])
    return buf.getvalue()


class WriterStage:
    """Ray Data batch callable: writes the good rows of a batch (decoded segments, possibly with teacher
    columns) as one Parquet file in ``schema`` under ``directory``; returns its WRITE_SUMMARY row.

    Args:
        directory: where the files go (``<prefix>-<16 hex digits>.parquet``).
        schema: the stored schema; the good rows are selected and cast to it.
        storage_options: the storage to write to (None: local disk / the AWS environment).
        prefix: the file name prefix (``part`` for decode outputs, ``shard`` for token shards).
        transform: maps the good rows to ``schema``'s columns before the cast (e.g. adds token metadata).

    Like :class:`~spear.stages.decode.DecodeStage`, the jobs map an instance, run as Ray tasks of
    :data:`WRITER_CPUS` each; the storage client is one per worker process.
    """

    def __init__(self, directory: str, schema: pa.Schema, storage_options: StorageOptions | None = None,
                 prefix: str = "part", transform: Optional[Callable[[pa.Table], pa.Table]] = None):
        self.directory = directory
        self.schema = schema
        self.storage_options = storage_options
        self.prefix = prefix
        self.transform = transform

    def __call__(self, batch: pa.Table) -> pa.Table:
        for name in ("quarantine_stage", "quarantine_reason"):
            col = batch[name]
            if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                # numpy-format stages (the teachers) turn an all-null column into float NaN: it holds no reasons
                batch = batch.set_column(batch.schema.get_field_index(name), name, pa.nulls(batch.num_rows, pa.string()))
        bad_mask = pc.is_valid(batch["quarantine_reason"])
        bad = batch.filter(bad_mask)
        good = batch.filter(pc.invert(bad_mask))
        file, size = "", 0
        if good.num_rows:
            table = self.transform(good) if self.transform is not None else good
            # rows from producers that know nothing of Lhotse cuts: their cut metadata columns are null
            table = with_cut_metadata(table, self.schema.names)
            data = parquet_bytes(table.select(self.schema.names).cast(self.schema))
            file = join_uri(self.directory, f"{self.prefix}-{uuid.uuid4().hex[:16]}.parquet")
            cached_storage(self.storage_options).write_bytes(file, data)
            size = len(data)
        objects: dict[str, WrittenObject] = {}
        for r in good.select(["source_uri", "source", "domain", "source_etag", "source_size", "object_segments",
                              "duration"]).to_pylist():
            o = objects.setdefault(r["source_uri"], WrittenObject(
                uri=r["source_uri"], source=r["source"], domain=r["domain"], etag=r["source_etag"],
                size=r["source_size"], segments=0, object_segments=r["object_segments"], audio_seconds=0.0))
            o["segments"] += 1
            o["audio_seconds"] += r["duration"]
        quarantine = [QuarantineRecord(uri=r["source_uri"], source=r["source"], domain=r["domain"],
                                       etag=r["source_etag"], size=r["source_size"], stage=r["quarantine_stage"],
                                       reason=r["quarantine_reason"])
                      for r in bad.select(["source_uri", "source", "domain", "source_etag", "source_size",
                                           "quarantine_stage", "quarantine_reason"]).to_pylist()]
        audio_seconds = float(pc.sum(good["duration"]).as_py() or 0.0) if good.num_rows else 0.0
        return summary_table(file, rows=good.num_rows, size=size, audio_seconds=audio_seconds,
                             objects=list(objects.values()), quarantine=quarantine)


class ObjectTracker:
    """Driver side: folds WRITE_SUMMARY rows into per-object progress; tells which objects are complete.

    An object is complete once the files reported so far hold all of its ``object_segments``
    segments, whichever files and in whatever order they came.

    Example::

        >>> t = ObjectTracker()
        >>> obj = {"uri": "/c/a.wav", "source": "c", "domain": "speech", "etag": "1-2", "size": 9,
        ...        "segments": 1, "object_segments": 2, "audio_seconds": 1.5}
        >>> t.add(summary_table("/o/part-1.parquet", rows=1, size=10, audio_seconds=1.5, objects=[obj],
        ...                     quarantine=[]).to_pylist()[0])
        {'segments': 1, 'objects': 0, 'quarantined': 0, 'kept in part': 0}
        >>> t.add(summary_table("/o/part-2.parquet", rows=1, size=10, audio_seconds=1.5, objects=[obj],
        ...                     quarantine=[]).to_pylist()[0])["objects"], t.take_completed()[0]["segments"]
        (1, 2)
    """

    def __init__(self) -> None:
        self.partial: dict[str, WrittenObject] = {}
        self.completed: list[WrittenObject] = []    # not yet handed out by take_completed()
        self.quarantined: list[QuarantineRecord] = []
        self.files: list[dict[str, Any]] = []       # {"file", "rows", "bytes"} of non-empty files
        self.rows = 0
        self.audio_seconds = 0.0
        self.completed_total = 0

    def add(self, summary_row: dict[str, Any]) -> dict[str, int]:
        """Fold one summary row in; returns counts for a progress line."""
        if summary_row["file"]:
            self.files.append({"file": summary_row["file"], "rows": summary_row["rows"], "bytes": summary_row["bytes"]})
        self.rows += summary_row["rows"]
        self.audio_seconds += summary_row["audio_seconds"]
        done = 0
        for o in written_objects(summary_row):
            cur = self.partial.get(o["uri"])
            if cur is None:
                cur = self.partial[o["uri"]] = WrittenObject(**{**o, "segments": 0, "audio_seconds": 0.0})
            cur["segments"] += o["segments"]
            cur["audio_seconds"] += o["audio_seconds"]
            if cur["segments"] >= cur["object_segments"]:
                self.completed.append(self.partial.pop(o["uri"]))
                done += 1
        self.completed_total += done
        new_q = quarantine_records(summary_row)
        self.quarantined.extend(new_q)
        kept_in_part = sum(1 for q in new_q if is_partial(q))  # counted as the job's summary counts them
        return {"segments": summary_row["rows"], "objects": done, "quarantined": len(new_q) - kept_in_part,
                "kept in part": kept_in_part}

    def take_completed(self) -> list[WrittenObject]:
        """The objects completed since the last call (each handed out once)."""
        out, self.completed = self.completed, []
        return out
