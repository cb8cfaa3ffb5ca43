"""Decode stage: catalog rows in, 16 kHz mono FLAC segments (or quarantine records) out.

:class:`DecodeStage` maps a batch of catalog rows (:data:`~spear.schemas.catalog.CATALOG_SCHEMA`)
to decoded rows (:data:`~spear.schemas.segments.DECODED_SCHEMA`). A row that is a Lhotse cut
becomes exactly one segment, its range and channels of its recording
(:func:`~spear.stages.lhotse_source.decode_cut_rows`). Each other object is read whole,
hashed, decoded, downmixed, resampled and cut into segments of at most ``max_segment_seconds``.
An object that cannot be read or decoded becomes a single row whose ``quarantine_reason`` says
why; its neighbours are unaffected. A truncated or damaged object keeps the part decoded before
the damage (if at least ``min_segment_seconds``): its segments plus one quarantine row whose
reason starts with ``partial:`` (:func:`~spear.schemas.quarantine.is_partial`).

:func:`decode_dataset` wires it into a Ray Dataset; the jobs continue from there.

Example::

    ds = decode_dataset(catalog.objects, DecodeConfig(), storage_options)
    for batch in ds.iter_batches(batch_format="pyarrow"):
        ...
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from spear.cluster.storage import StorageError, StorageOptions, cached_storage
from spear.config import DecodeConfig
from spear.schemas.catalog import CatalogObject
from spear.schemas.quarantine import partial_reason
from spear.schemas.segments import CUT_METADATA_COLUMNS, DECODED_SCHEMA, segment_id
from spear.stages.audio import AudioDecodeError, decode_segments, flac_encode
from spear.stages.lhotse_source import cut_rows_mask, decode_cut_rows, plan_cut_blocks


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in DECODED_SCHEMA.names}


def _append_quarantine(cols: dict[str, list], obj: Mapping[str, Any], stage: str, reason: str) -> None:
    for name in DECODED_SCHEMA.names:
        cols[name].append(None)
    row = {"segment_id": "", "source": obj["source"], "source_uri": obj["uri"], "relative_path": obj["relative_path"],
           "source_etag": obj["etag"], "source_size": int(obj["size"]), "content_sha256": "", "domain": obj["domain"],
           "offset": 0, "num_samples": 0, "duration": 0.0, "sample_rate": 0, "source_sample_rate": 0,
           "source_channels": 0, "source_format": "", "object_segments": 0, "quarantine_stage": stage,
           "quarantine_reason": reason}
    for k, v in row.items():
        cols[k][-1] = v


def decode_object(obj: CatalogObject, data: bytes, cfg: DecodeConfig, cols: dict[str, list]) -> None:
    """Append the segments of one object (or its quarantine row) to ``cols`` (DECODED_SCHEMA columns)."""
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
        for name in CUT_METADATA_COLUMNS:  # file sources have no cut metadata
            cols[name].append(None)


class DecodeStage:
    """Ray Data batch callable: catalog rows (Arrow) in, decoded segment rows (DECODED_SCHEMA) out.

    Args:
        decode: the decode settings (sample rate, segment lengths, FLAC level).
        storage_options: where the objects are read from (None: local disk / the AWS environment).

    The jobs map an *instance* (``ds.map_batches(DecodeStage(cfg, options), ...)``), which Ray Data
    runs as tasks, not actors: decoding holds nothing worth keeping between batches but the
    storage client (one per worker process, :func:`~spear.cluster.storage.cached_storage`), and a
    task gives its CPUs back to the teacher actors as soon as its batch is done.

    Example::

        stage = DecodeStage(DecodeConfig())
        decoded = stage(catalog.objects)          # a pa.Table in DECODED_SCHEMA, one batch
    """

    def __init__(self, decode: DecodeConfig, storage_options: StorageOptions | None = None):
        self.cfg = decode
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        storage = cached_storage(self.storage_options)
        cols = _empty_columns()
        rows = batch.to_pylist()
        cuts = [obj for obj in rows if obj.get("cut_id") is not None]
        if cuts:  # Lhotse cuts: each decoded as its own range of its recording (stages/lhotse_source.py)
            decode_cut_rows(cuts, storage, self.cfg, cols)
        for obj in rows:
            if obj.get("cut_id") is not None:
                continue
            try:
                data = storage.read_bytes(obj["uri"])
            except FileNotFoundError:
                _append_quarantine(cols, obj, "read", "object vanished between listing and reading")
                continue
            except (StorageError, OSError) as exc:
                _append_quarantine(cols, obj, "read", f"read failed: {exc}")
                continue
            decode_object(obj, data, self.cfg, cols)
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
    cut_mask = cut_rows_mask(objects)
    if cut_mask is not None:
        # Lhotse cuts go to tasks of their own, grouped by recording (one read of it per task); files as below.
        files = objects.filter(pa.array(~cut_mask))
        cut_blocks = plan_cut_blocks(objects.filter(pa.array(cut_mask)), objects_per_task,
                                     int(np.ceil(TASKS_PER_SLOT * slots)))
        return cut_blocks + (plan_decode_blocks(files, objects_per_task, slots) if files.num_rows else [])
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


def decode_dataset(objects: pa.Table, decode_cfg: DecodeConfig, storage_options: StorageOptions | None = None):
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
    return ds.map_batches(DecodeStage(decode_cfg, storage_options), batch_format="pyarrow", batch_size=None,
                          zero_copy_batch=True, num_cpus=decode_cfg.num_cpus_per_task)
