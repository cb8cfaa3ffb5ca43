"""Writer stage: batches of rows -> Parquet files on any storage, with one summary row per file.

Files are written whole through :meth:`Storage.write_bytes` (atomic on local disk, a single
PUT on S3), so a reader never sees half a file. Binary payload columns (FLAC audio, token
bytes) are stored without dictionary encoding or compression: they are incompressible and
read back at memory speed.

The summary row tells the driver which objects the file holds and how many of each
object's segments (``object_segments`` says how many there are in all), so the driver can
commit an object once all of its segments are on storage, and collects quarantined objects.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.storage import StorageOptions, join_uri
from spear.stages.decode import _storage

UNCOMPRESSED_COLUMNS = ("audio",)

WRITE_SUMMARY = pa.schema([
    pa.field("file", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("bytes", pa.int64()),
    pa.field("audio_seconds", pa.float64()),
    pa.field("objects", pa.list_(pa.string())),     # JSON: uri, source, domain, etag, size, segments, object_segments, audio_seconds
    pa.field("quarantine", pa.list_(pa.string())),  # JSON: uri, source, domain, etag, size, stage, reason
])


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


def write_batch(batch: pa.Table, *, directory: str, storage_options: StorageOptions | None, schema: pa.Schema,
                prefix: str = "part", transform: Optional[Callable[[pa.Table], pa.Table]] = None) -> pa.Table:
    """Ray Data batch function: write the good rows of ``batch`` (decoded segments, possibly with
    teacher columns) as one Parquet file in ``schema``; return its WRITE_SUMMARY row.

    ``transform`` maps the good rows to ``schema``'s columns before the cast (e.g. adds token metadata).
    """
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
        table = transform(good) if transform is not None else good
        data = parquet_bytes(table.select(schema.names).cast(schema))
        file = join_uri(directory, f"{prefix}-{uuid.uuid4().hex[:16]}.parquet")
        _storage(storage_options).write_bytes(file, data)
        size = len(data)
    objects: dict[str, dict[str, Any]] = {}
    for r in good.select(["source_uri", "source", "domain", "source_etag", "source_size", "object_segments",
                          "duration"]).to_pylist():
        o = objects.setdefault(r["source_uri"], {"uri": r["source_uri"], "source": r["source"], "domain": r["domain"],
                                                 "etag": r["source_etag"], "size": r["source_size"], "segments": 0,
                                                 "object_segments": r["object_segments"], "audio_seconds": 0.0})
        o["segments"] += 1
        o["audio_seconds"] += r["duration"]
    quarantine = [json.dumps({"uri": r["source_uri"], "source": r["source"], "domain": r["domain"],
                              "etag": r["source_etag"], "size": r["source_size"], "stage": r["quarantine_stage"],
                              "reason": r["quarantine_reason"]})
                  for r in bad.select(["source_uri", "source", "domain", "source_etag", "source_size",
                                       "quarantine_stage", "quarantine_reason"]).to_pylist()]
    audio_seconds = float(pc.sum(good["duration"]).as_py() or 0.0) if good.num_rows else 0.0
    return pa.table({"file": [file], "rows": [good.num_rows], "bytes": [size], "audio_seconds": [audio_seconds],
                     "objects": [[json.dumps(o) for o in objects.values()]], "quarantine": [quarantine]},
                    schema=WRITE_SUMMARY)


class ObjectTracker:
    """Driver side: folds WRITE_SUMMARY rows into per-object progress; tells which objects are complete."""

    def __init__(self) -> None:
        self.partial: dict[str, dict[str, Any]] = {}
        self.completed: list[dict[str, Any]] = []   # not yet handed out by take_completed()
        self.quarantined: list[dict[str, Any]] = []
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
        for text in summary_row["objects"]:
            o = json.loads(text)
            cur = self.partial.get(o["uri"])
            if cur is None:
                cur = self.partial[o["uri"]] = dict(o, segments=0, audio_seconds=0.0)
            cur["segments"] += o["segments"]
            cur["audio_seconds"] += o["audio_seconds"]
            if cur["segments"] >= cur["object_segments"]:
                self.completed.append(self.partial.pop(o["uri"]))
                done += 1
        self.completed_total += done
        new_q = [json.loads(q) for q in summary_row["quarantine"]]
        self.quarantined.extend(new_q)
        return {"segments": summary_row["rows"], "objects": done, "quarantined": len(new_q)}

    def take_completed(self) -> list[dict[str, Any]]:
        out, self.completed = self.completed, []
        return out
