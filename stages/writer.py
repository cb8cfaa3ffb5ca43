"""Writer stage: batches of rows -> Parquet part files on any storage, with a summary row per file.

Files are written whole through :meth:`Storage.write_bytes` (atomic on local disk, a single
PUT on S3), so a reader never sees half a file. Binary payload columns (FLAC audio, token
bytes) are stored without dictionary encoding or compression: they are incompressible and
read back at memory speed.
"""

from __future__ import annotations

import io
import uuid
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from spear.cluster.storage import StorageOptions, join_uri
from spear.stages.decode import _storage

UNCOMPRESSED_COLUMNS = ("audio",)


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


def write_part(table: pa.Table, directory: str, storage_options: StorageOptions | None, prefix: str = "part") -> str:
    """Write one Parquet part under ``directory``; returns its URI."""
    uri = join_uri(directory, f"{prefix}-{uuid.uuid4().hex[:16]}.parquet")
    _storage(storage_options).write_bytes(uri, parquet_bytes(table))
    return uri


SEGMENT_WRITE_SUMMARY = pa.schema([
    pa.field("file", pa.string()),
    pa.field("segments", pa.int64()),
    pa.field("objects", pa.int64()),          # objects whose first segment is in this batch
    pa.field("audio_seconds", pa.float64()),
    pa.field("quarantine", pa.list_(pa.string())),  # JSON records of quarantined objects
])


def write_segment_batch(batch: pa.Table, *, directory: str, storage_options: StorageOptions | None,
                        prefix: str = "part") -> pa.Table:
    """Ray Data batch function: write the good segments of ``batch`` as one part; return its summary row."""
    import json

    import pyarrow.compute as pc

    bad_mask = pc.is_valid(batch["quarantine_reason"])
    bad = batch.filter(bad_mask)
    good = batch.filter(pc.invert(bad_mask)).drop_columns(["quarantine_stage", "quarantine_reason"])
    file = write_part(_as_segments(good), directory, storage_options, prefix) if good.num_rows else ""
    quarantine = [json.dumps({"uri": r["source_uri"], "source": r["source"], "domain": r["domain"],
                              "etag": r["source_etag"], "stage": r["quarantine_stage"],
                              "reason": r["quarantine_reason"]}) for r in bad.to_pylist()]
    row: dict[str, Any] = {
        "file": [file],
        "segments": [good.num_rows],
        "objects": [int(pc.sum(pc.equal(good["offset"], 0)).as_py() or 0) if good.num_rows else 0],
        "audio_seconds": [float(pc.sum(good["duration"]).as_py() or 0.0) if good.num_rows else 0.0],
        "quarantine": [quarantine],
    }
    return pa.table(row, schema=SEGMENT_WRITE_SUMMARY)


def _as_segments(table: pa.Table) -> pa.Table:
    from spear.schemas.segments import SEGMENT_SCHEMA

    return table.select(SEGMENT_SCHEMA.names).cast(SEGMENT_SCHEMA)
