"""Decode stage: catalog rows in, 16 kHz mono FLAC segments (or quarantine records) out.

:func:`decode_objects` is a Ray Data ``map_batches`` function over catalog rows. Each object
is read whole, hashed, decoded, downmixed, resampled and cut into segments of at most
``max_segment_seconds``. An object that cannot be read or decoded becomes a single row
whose ``quarantine_reason`` says why; its neighbours are unaffected. A truncated or damaged
object keeps the part decoded before the damage (if at least ``min_segment_seconds``): its
segments plus one quarantine row whose reason starts with ``partial:`` (:func:`is_partial`).

:func:`decode_dataset` wires it into a Ray Dataset; the tokenisation job continues from there.

Example::

    ds = decode_dataset(catalog.objects, DecodeConfig(), storage_options)
    for batch in ds.iter_batches(batch_format="pyarrow"):
        ...
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from spear.cluster.storage import Storage, StorageError, StorageOptions
from spear.schemas.segments import SEGMENT_FIELDS, segment_id
from spear.stages.audio import AudioDecodeError, decode_segments, flac_encode

# The decode stage's output: segment columns plus the quarantine verdict (null for good rows).
DECODED_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name == "audio" else f for f in SEGMENT_FIELDS]
    + [pa.field("object_segments", pa.int32()),  # segments of the whole object: lets writers tell when it is complete
       pa.field("quarantine_stage", pa.string()), pa.field("quarantine_reason", pa.string())]
)

_STORAGE_CACHE: dict[StorageOptions, Storage] = {}


def _storage(options: StorageOptions | None) -> Storage:
    # One client per worker process: creating an S3 client per batch costs more than decoding.
    options = options or StorageOptions()
    st = _STORAGE_CACHE.get(options)
    if st is None:
        st = _STORAGE_CACHE[options] = Storage(options)
    return st


PARTIAL_PREFIX = "partial: "


def partial_reason(kept_seconds: float, declared_seconds: float | None, cause: str) -> str:
    """The quarantine reason of an object whose decodable part was kept.

    >>> partial_reason(3.2, 6.4, "truncated: 51200 of 102400 frames present")
    'partial: kept 3.2 s of ~6.4 s: truncated: 51200 of 102400 frames present'
    """
    whole = f"of ~{declared_seconds:.1f} s" if declared_seconds else "(whole length unknown)"
    return f"{PARTIAL_PREFIX}kept {kept_seconds:.1f} s {whole}: {cause}"


def is_partial(quarantine: dict[str, Any]) -> bool:
    """Whether a quarantine record notes a partly kept object (its kept segments are committed as usual)."""
    return quarantine.get("stage") == "decode" and str(quarantine.get("reason") or "").startswith(PARTIAL_PREFIX)


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in DECODED_SCHEMA.names}


def _append_quarantine(cols: dict[str, list], obj: dict[str, Any], stage: str, reason: str) -> None:
    for name in DECODED_SCHEMA.names:
        cols[name].append(None)
    row = {"segment_id": "", "source": obj["source"], "source_uri": obj["uri"], "relative_path": obj["relative_path"],
           "source_etag": obj["etag"], "source_size": int(obj["size"]), "content_sha256": "", "domain": obj["domain"],
           "offset": 0, "num_samples": 0, "duration": 0.0, "sample_rate": 0, "source_sample_rate": 0,
           "source_channels": 0, "source_format": "", "object_segments": 0, "quarantine_stage": stage,
           "quarantine_reason": reason}
    for k, v in row.items():
        cols[k][-1] = v


def decode_object(obj: dict[str, Any], data: bytes, cfg: Any, cols: dict[str, list]) -> None:
    """Append the segments of one object (or its quarantine row) to ``cols``."""
    try:
        info, segments = decode_segments(data, target_rate=cfg.sample_rate, max_segment_seconds=cfg.max_segment_seconds,
                                         min_segment_seconds=cfg.min_segment_seconds, keep_partial=True)
    except AudioDecodeError as exc:
        _append_quarantine(cols, obj, "decode", exc.reason)
        return
    if not segments:
        short = f"shorter than min_segment_seconds={cfg.min_segment_seconds}"
        _append_quarantine(cols, obj, "decode", f"{info.partial}; the part before it is {short}" if info.partial else short)
        return
    if info.partial:
        # A quarantine note besides the kept segments; object_segments counts the kept ones, so the object completes.
        kept = sum(pcm.size for _, pcm in segments) / cfg.sample_rate
        _append_quarantine(cols, obj, "decode", partial_reason(kept, info.declared_seconds, info.partial))
    sha = hashlib.sha256(data).hexdigest()
    for offset, pcm in segments:
        cols["segment_id"].append(segment_id(obj["source"], obj["relative_path"], sha, offset))
        cols["source"].append(obj["source"])
        cols["source_uri"].append(obj["uri"])
        cols["relative_path"].append(obj["relative_path"])
        cols["source_etag"].append(obj["etag"])
        cols["source_size"].append(int(obj["size"]))
        cols["content_sha256"].append(sha)
        cols["domain"].append(obj["domain"])
        cols["offset"].append(int(offset))
        cols["num_samples"].append(int(pcm.size))
        cols["duration"].append(pcm.size / cfg.sample_rate)
        cols["sample_rate"].append(cfg.sample_rate)
        cols["audio"].append(flac_encode(pcm, cfg.sample_rate, cfg.flac_compression))
        cols["source_sample_rate"].append(info.sample_rate)
        cols["source_channels"].append(info.channels)
        cols["source_format"].append(info.format)
        cols["object_segments"].append(len(segments))
        cols["quarantine_stage"].append(None)
        cols["quarantine_reason"].append(None)


def decode_objects(batch: pa.Table, *, decode_cfg: Any, storage_options: StorageOptions | None = None) -> pa.Table:
    """Ray Data batch function: catalog rows -> decoded segment rows (DECODED_SCHEMA)."""
    storage = _storage(storage_options)
    cols = _empty_columns()
    for obj in batch.to_pylist():
        try:
            data = storage.read_bytes(obj["uri"])
        except FileNotFoundError:
            _append_quarantine(cols, obj, "read", "object vanished between listing and reading")
            continue
        except (StorageError, OSError) as exc:
            _append_quarantine(cols, obj, "read", f"read failed: {exc}")
            continue
        decode_object(obj, data, decode_cfg, cols)
    return pa.table(cols, schema=DECODED_SCHEMA)


# Decode tasks per concurrent slot: enough that the run's tail is short, few enough that the
# per-task overhead (scheduling, one Arrow block each) stays small. bench/decode.py on 2 CPUs:
# 4 per slot beat 8 and 16 (each extra task costs a Ray Data block round trip).
TASKS_PER_SLOT = 4


def plan_decode_blocks(objects: pa.Table, objects_per_task: int, slots: float) -> list[pa.Table]:
    """Split the catalog rows into decode tasks of about equal bytes.

    There are enough tasks for every object to sit in one of at most ``objects_per_task``, and at
    least ``TASKS_PER_SLOT`` per concurrent decode slot, so the last tasks of a run do not leave
    most CPUs idle while one straggler finishes. Objects are sorted by size and dealt to the tasks
    in snake order (0..B-1, B-1..0, ...), which evens out the bytes per task; tasks with the most
    bytes come first.

    >>> t = pa.table({"size": [9, 1, 5, 3, 7, 2], "uri": list("abcdef")})
    >>> [b["size"].to_pylist() for b in plan_decode_blocks(t, objects_per_task=2, slots=1)]
    [[9], [7], [5, 1], [3, 2]]
    >>> [b["size"].to_pylist() for b in plan_decode_blocks(t, objects_per_task=3, slots=0.25)]
    [[9, 3, 2], [7, 5, 1]]
    """
    n = objects.num_rows
    if n == 0:
        return []
    num_blocks = min(n, max(-(-n // max(1, objects_per_task)), int(np.ceil(TASKS_PER_SLOT * slots))))
    order = pa.compute.sort_indices(objects, sort_keys=[("size", "descending"), ("uri", "ascending")]).to_numpy()
    lap, pos = np.divmod(np.arange(n), num_blocks)
    block_of = np.where(lap % 2 == 0, pos, num_blocks - 1 - pos)
    sizes = objects["size"].to_numpy(zero_copy_only=False).astype(np.int64)[order]
    totals = np.bincount(block_of, weights=sizes, minlength=num_blocks)
    # One stable sort groups the rows by task (size order kept within each): O(n log n), not O(n x tasks).
    grouped = order[np.argsort(block_of, kind="stable")]
    members = np.split(grouped, np.cumsum(np.bincount(block_of, minlength=num_blocks))[:-1])
    return [objects.take(pa.array(members[b])) for b in sorted(range(num_blocks), key=lambda b: (-totals[b], b))]


def decode_dataset(objects: pa.Table, decode_cfg: Any, storage_options: StorageOptions | None = None):
    """A Ray Dataset of decoded segments (and quarantine rows) over the catalog table ``objects``.

    Objects go to decode tasks of about equal bytes (:func:`plan_decode_blocks`), at most
    ``decode_cfg.objects_per_task`` each and at least a few per CPU the cluster can give them.
    """
    import ray

    if objects.num_rows == 0:
        return ray.data.from_arrow(pa.table(_empty_columns(), schema=DECODED_SCHEMA))
    # A fractional reservation (tokenize shares CPUs with teacher actors) does not add cores.
    slots = ray.cluster_resources().get("CPU", 1.0) / max(1.0, decode_cfg.num_cpus_per_task)
    blocks = plan_decode_blocks(objects, decode_cfg.objects_per_task, slots)
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(decode_objects, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          fn_kwargs={"decode_cfg": decode_cfg, "storage_options": storage_options},
                          num_cpus=decode_cfg.num_cpus_per_task)
