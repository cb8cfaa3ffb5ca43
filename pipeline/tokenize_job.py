"""The tokenisation job (`spear tokenize`): catalog -> diff -> [pass 1: fit MVQ] -> pass 2 -> shards -> commits.

1. catalog every source; diff against the token version's ledger: only objects that are new,
   or whose etag/size changed, go on (a changed object's old rows are superseded);
2. for each teacher role (``speech`` on every domain, ``audio`` on audio-domain data only):
   load the codebooks for that teacher version, or fit them (pass 1, :mod:`spear.stages.quantize`);
3. pass 2 on Ray Data: decode -> speech teacher + MVQ (one actor) -> audio teacher + MVQ
   (one actor, audio-domain rows) -> token shard writer;
4. the driver commits finished objects (and quarantined ones) every ``tokenize.commit_interval_s``
   and at the end (:class:`~spear.pipeline.ledger.TokenStore`): a crash loses at most one interval.

Example::

    cfg = load_config("spear.yaml")
    summary = run_tokenize(cfg)
    print(summary.token_version, summary.new_objects, summary.committed_segments)
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageOptions, join_uri
from spear.pipeline.config import ConfigError, SpearConfig, TeacherConfig
from spear.pipeline.ledger import TokenStore
from spear.pipeline.progress import Progress
from spear.schemas.shards import token_shard_schema, token_version
from spear.stages.catalog import Catalog, build_catalog
from spear.stages.writer import ObjectTracker, write_batch

# CPU reservation of a shard-writer task (mostly waiting on storage).
WRITER_CPUS = 0.25
ROLE_DOMAINS: dict[str, Optional[tuple[str, ...]]] = {"speech": None, "audio": ("audio",)}


@dataclass
class CodebookInfo:
    uri: str
    version: str
    teacher: str
    teacher_version: str
    num_codebooks: int
    frame_rate: float
    dim: int
    fitted_now: bool
    heldout_loss: Optional[float] = None
    sample_frames: Optional[int] = None


@dataclass
class TokenizeSummary:
    """What `spear tokenize` did; ``to_dict()`` is the ``--json`` object."""

    objects: int                  # objects listed (good and bad)
    new_objects: int              # tokenised in this run
    skipped_objects: int          # already committed and unchanged
    segments: int                 # segments tokenised in this run
    audio_seconds: float          # audio tokenised in this run
    quarantined: list[dict] = field(default_factory=list)
    output: str = ""
    token_version: str = ""
    committed_segments: int = 0   # live segments of the token version after the run
    committed_objects: int = 0
    commits: int = 0
    codebooks: dict[str, CodebookInfo] = field(default_factory=dict)
    token_bytes: dict[str, int] = field(default_factory=dict)   # raw token bytes written this run, per role
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quarantined"] = [{"uri": q["uri"], "reason": q["reason"], "stage": q["stage"]} for q in self.quarantined]
        d["audio_hours"] = self.audio_seconds / 3600
        d["realtime_factor"] = self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0
        return d

    def human(self) -> str:
        lines = [f"token version {self.token_version} at {self.output}",
                 f"tokenised {self.new_objects} new/changed objects ({self.segments} segments, "
                 f"{self.audio_seconds / 3600:.3f} h) in {self.wall_seconds:.1f} s; {self.skipped_objects} already done",
                 f"committed: {self.committed_objects} objects, {self.committed_segments} segments ({self.commits} commits this run)"]
        for role, cb in self.codebooks.items():
            how = "fitted now" if cb.fitted_now else "reused"
            loss = f", held-out relative loss {cb.heldout_loss:.3f}" if cb.heldout_loss is not None else ""
            lines.append(f"{role} teacher {cb.teacher} ({cb.frame_rate:g} Hz, {cb.dim}-d): codebooks {cb.version[:12]} "
                         f"x{cb.num_codebooks} ({how}{loss})")
        if self.quarantined:
            lines.append(f"quarantined {len(self.quarantined)}:")
            lines += [f"  {q['uri']}: {q['reason']}" for q in self.quarantined]
        return "\n".join(lines)


def teacher_pool_kwargs(tcfg: TeacherConfig, resources: dict[str, float], pools: int,
                        actors: Optional[int]) -> dict[str, Any]:
    """``map_batches`` resources of one of ``pools`` teacher actor pools running side by side.

    Each pool is planned over its share of the cluster (``resources`` / ``pools``): two CPU pools
    planned over the whole cluster would together hold every CPU and starve the decode tasks;
    two GPU pools on one GPU take half of it each.
    """
    from spear.stages.teacher import plan_teacher_pool

    share = {k: float(v) / pools for k, v in resources.items() if k in ("CPU", "GPU")}
    plan = plan_teacher_pool(tcfg, resources=share, actors=actors)
    kwargs = plan.map_batches_kwargs()
    if not plan.num_gpus:
        # CPU actors hold their reservation for the whole run: on a small cluster, whole CPUs for
        # every pool would leave none for the decode tasks feeding them (Ray Data would stall).
        kwargs["num_cpus"] = min(plan.num_cpus, max(0.1, share.get("CPU", 1.0) / 4))
    return kwargs


def decode_task_cpus(configured: float, cluster_cpus: float, pools: Iterable[dict[str, Any]],
                     writer_cpus: float, nodes: int = 1) -> float:
    """CPU reservation of one decode task: the configured one, cut to what the actor pools leave.

    Actors hold their reservation for the whole run; a decode task asking for more than is left
    would never schedule and the job would stall (a 1-CPU cluster with two CPU teacher pools).
    A task runs on one node: over ``nodes`` CPU nodes, whatever the placement of the actors, some
    node keeps at least the mean of what is left, so that is the most a task may ask for (two
    1-CPU nodes holding two 0.25-CPU actors and a 0.25-CPU writer keep 0.625 free on some node,
    never the 1.25 of the sum).
    """
    held = writer_cpus + sum(kw.get("num_cpus", 0.0) * kw["compute"].max_size for kw in pools)
    return min(configured, max(0.1, round((cluster_cpus - held) / max(1, nodes), 3)))


def stage_resources(cfg: SpearConfig, roles: dict[str, TeacherConfig], log) -> tuple[dict[str, dict[str, Any]], Any]:
    """Teacher pool ``map_batches`` kwargs per role, and the decode config with a reservation that fits beside them."""
    import ray

    resources = ray.cluster_resources()
    pools = {role: teacher_pool_kwargs(tcfg, resources, len(roles), cfg.tokenize.teacher_actors)
             for role, tcfg in roles.items()}
    cpus = float(resources.get("CPU", 1.0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    decode_cpus = decode_task_cpus(cfg.decode.num_cpus_per_task, cpus, pools.values(), WRITER_CPUS, nodes)
    if decode_cpus < cfg.decode.num_cpus_per_task:
        log(f"[tokenize] decode tasks reserve {decode_cpus:g} CPU (of {cfg.decode.num_cpus_per_task:g} configured): "
            f"the teacher actors hold the rest of {cpus:g} on {max(1, nodes)} node(s)")
    return pools, cfg.decode.model_copy(update={"num_cpus_per_task": decode_cpus})


def _describe_teacher(cfg: TeacherConfig, options: StorageOptions | None) -> dict[str, Any]:
    from spear.models.teachers import load_teacher

    teacher = load_teacher(cfg, storage=Storage(options) if options else None, device="cpu")
    return teacher.describe()


def add_token_metadata(table: pa.Table, *, run_id: str, roles: dict[str, dict[str, Any]]) -> pa.Table:
    """Writer transform: run id and, per role, the token metadata columns; tokens null where a role does not apply."""
    n = table.num_rows
    table = table.append_column("run_id", pa.array([run_id] * n, pa.string()))
    domains = table["domain"]
    for role, meta in roles.items():
        applies = pa.array([True] * n) if meta["domains"] is None else pc.is_in(domains, value_set=pa.array(meta["domains"]))
        tok = table[f"{role}_tokens"]
        if not pa.types.is_binary(tok.type):
            tok = tok.cast(pa.binary())
        nf = table[f"{role}_num_frames"].cast(pa.int32())
        null_bin, null_int = pa.nulls(n, pa.binary()), pa.nulls(n, pa.int32())
        table = table.set_column(table.schema.get_field_index(f"{role}_tokens"), f"{role}_tokens",
                                 pc.if_else(applies, tok, null_bin))
        table = table.set_column(table.schema.get_field_index(f"{role}_num_frames"), f"{role}_num_frames",
                                 pc.if_else(applies, nf, null_int))
        for col, value, typ in ((f"{role}_num_codebooks", meta["num_codebooks"], pa.int16()),
                                (f"{role}_frame_rate", meta["frame_rate"], pa.float32()),
                                (f"{role}_codebook", meta["codebook"], pa.string())):
            table = table.append_column(col, pc.if_else(applies, pa.array([value] * n, typ), pa.nulls(n, typ)))
    return table


def diff_catalog(objects: pa.Table, ledger: pa.Table) -> tuple[pa.Table, int]:
    """(objects to tokenise: new or changed, number already committed and unchanged)."""
    if ledger.num_rows == 0 or objects.num_rows == 0:
        return objects, 0
    done = {(u, e, s) for u, e, s in zip(ledger["source_uri"].to_pylist(), ledger["etag"].to_pylist(),
                                         ledger["size"].to_pylist())}
    keep = [(u, e, s) not in done for u, e, s in zip(objects["uri"].to_pylist(), objects["etag"].to_pylist(),
                                                     objects["size"].to_pylist())]
    mask = pa.array(keep)
    return objects.filter(mask), int(len(keep) - sum(keep))


def _ensure_codebooks(cfg: SpearConfig, role: str, tcfg: TeacherConfig, desc: dict[str, Any], objects: pa.Table,
                      storage: Storage, options: StorageOptions, rinfo, log) -> CodebookInfo:
    from spear.models.mvq import MultiCodebookQuantizer
    from spear.models.mvq.artefact import META_NAME
    from spear.stages.quantize import codebook_uri, fit_quantizer, sample_teacher_frames

    num_codebooks = cfg.mvq.speech_codebooks if role == "speech" else cfg.mvq.audio_codebooks
    uri = codebook_uri(cfg.output, role, desc["version"], num_codebooks, cfg.mvq.codebook_size)
    common = dict(uri=uri, teacher=desc["name"], teacher_version=desc["version"], num_codebooks=num_codebooks,
                  frame_rate=float(desc["frame_rate"]), dim=int(desc["dim"]))
    if storage.exists(join_uri(uri, META_NAME)):
        q = MultiCodebookQuantizer.load(uri, storage=storage)
        q.check_compatible(teacher_id=desc["version"], dim=int(desc["dim"]), num_codebooks=num_codebooks,
                           codebook_size=cfg.mvq.codebook_size)
        return CodebookInfo(version=q.version, fitted_now=False, heldout_loss=q.metadata.get("heldout_relative_loss"),
                            sample_frames=q.metadata.get("training_frames"), **common)
    log(f"[tokenize] pass 1: fitting {role} codebooks for teacher {desc['name']} ({desc['version'][:12]})")
    pools, decode_cfg = stage_resources(cfg, {role: tcfg}, log)
    sample = sample_teacher_frames(objects, tcfg, decode_cfg, options, sample_frames=cfg.mvq.sample_frames,
                                   heldout_fraction=cfg.mvq.heldout_fraction, seed=cfg.mvq.seed, dim=int(desc["dim"]),
                                   frame_rate=float(desc["frame_rate"]), domains=ROLE_DOMAINS[role], progress=log,
                                   pool_kwargs=pools[role])
    extra = {"teacher": desc["name"], "teacher_kind": tcfg.kind, "frame_rate": float(desc["frame_rate"]), "role": role,
             "sample_segments": sample.segments, "sample_audio_seconds": sample.audio_seconds,
             "sample_sources": sample.sources}
    fit_kwargs = dict(num_codebooks=num_codebooks, codebook_size=cfg.mvq.codebook_size, seed=cfg.mvq.seed,
                      teacher_id=desc["version"], layer=tcfg.layer, extra=extra)
    if rinfo.gpus > 0:  # fit where the GPU is
        import ray

        q = ray.get(ray.remote(num_gpus=1, num_cpus=1)(fit_quantizer).remote(sample, **fit_kwargs))
    else:
        q = fit_quantizer(sample, **fit_kwargs)
    loss = q.metadata.get("heldout_relative_loss")
    if loss is None:
        loss = q.metadata.get("train_relative_loss")
    q.save(uri, storage=storage)
    _save_usage_plot(q, sample.heldout if sample.heldout.shape[0] else sample.train, uri, storage)
    log(f"[tokenize] {role} codebooks {q.version[:12]}: relative reconstruction loss {loss:.4f} "
        f"on {sample.heldout.shape[0]} held-out frames ({sample.train.shape[0]} fitted)")
    return CodebookInfo(version=q.version, fitted_now=True, heldout_loss=loss, sample_frames=int(sample.train.shape[0]),
                        **common)


def _save_usage_plot(q, frames: np.ndarray, uri: str, storage: Storage) -> None:
    import torch

    from spear.models.mvq import plot_codebook_usage

    codes = q.encode(torch.from_numpy(frames))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "usage.png")
        plot_codebook_usage(codes, path, codebook_size=q.codebook_size,
                            title=f"{q.metadata.get('extra', {}).get('teacher', '')} codebook usage (held-out frames)")
        with open(path, "rb") as f:
            storage.write_bytes(join_uri(uri, "usage.png"), f.read())


def run_tokenize(cfg: SpearConfig, *, progress: bool = True, catalog: Catalog | None = None) -> TokenizeSummary:
    """Run the tokenisation job described by ``cfg``; see the module docstring."""
    import sys

    from spear.stages.decode import decode_dataset
    from spear.stages.quantize import QuantizerEncoder
    from spear.stages.teacher import TeacherStage

    if not cfg.corpus.sources and catalog is None:
        raise ConfigError("no corpus sources: give --input URI[,URI...] --domain speech|audio, "
                          "or list corpus.sources in the config")
    t0 = time.monotonic()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    options = StorageOptions.from_config(cfg.storage)
    storage = Storage(options)
    out = cfg.output
    storage.check_access(out)
    if catalog is None:
        catalog = build_catalog(cfg.corpus.sources, storage)
    if catalog.num_objects == 0 and catalog.unreadable:
        from spear.cluster.storage import StorageError

        raise StorageError("no source could be listed: " + "; ".join(f"{u['uri']}: {u['reason']}" for u in catalog.unreadable))

    roles: dict[str, TeacherConfig] = {"speech": cfg.teachers.speech}
    if cfg.teachers.audio is not None:
        if "audio" in catalog.objects["domain"].to_pylist():
            roles["audio"] = cfg.teachers.audio
        else:
            # Nothing for the audio teacher (and nothing to fit its codebooks on): speech tokens only. Adding
            # audio-domain sources later makes a new token version with both teachers.
            log("[tokenize] no audio-domain objects: the audio teacher is skipped (speech-teacher tokens only)")

    with ray_session(cfg.ray) as rinfo:
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        describe = ray.remote(num_cpus=0.5)(_describe_teacher)
        descs = dict(zip(roles, ray.get([describe.remote(t, options) for t in roles.values()])))
        codebooks = {role: _ensure_codebooks(cfg, role, roles[role], descs[role], catalog.objects, storage, options,
                                             rinfo, log) for role in roles}
        decode_settings = {"sample_rate": cfg.decode.sample_rate, "max_segment_seconds": cfg.decode.max_segment_seconds,
                           "min_segment_seconds": cfg.decode.min_segment_seconds}
        version = token_version(decode_settings, {r: {"teacher": cb.teacher_version, "codebook": cb.version}
                                                  for r, cb in codebooks.items()})
        store = TokenStore(out, version, storage)
        store.write_version_info({"token_version": version, "decode": decode_settings,
                                  "teachers": {r: {**asdict(cb), "config": roles[r].model_dump(mode="json"),
                                                   "domains": ROLE_DOMAINS[r]} for r, cb in codebooks.items()}})
        todo, skipped = diff_catalog(catalog.objects, store.ledger())
        run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        tracker = ObjectTracker()
        commits = 0
        if todo.num_rows:
            log(f"[tokenize] pass 2: {todo.num_rows} new or changed objects ({skipped} already committed), run {run_id}")
            pools, decode_cfg = stage_resources(cfg, roles, log)
            ds = decode_dataset(todo, decode_cfg, options)
            for role, tcfg in roles.items():
                ds = ds.map_batches(TeacherStage, fn_constructor_kwargs={
                    "teacher": tcfg, "column_prefix": role, "storage_options": options,
                    "encode": QuantizerEncoder(codebooks[role].uri, options), "only_domains": ROLE_DOMAINS[role]},
                    **pools[role])
            role_meta = {r: {"domains": ROLE_DOMAINS[r], "num_codebooks": cb.num_codebooks, "frame_rate": cb.frame_rate,
                             "codebook": cb.version} for r, cb in codebooks.items()}
            per_row = cfg.decode.max_segment_seconds * cfg.tokenize.flac_bytes_per_second
            rows_per_shard = max(1, int(cfg.tokenize.shard_target_mb * 1e6 / per_row))
            ds = ds.map_batches(write_batch, batch_format="pyarrow", batch_size=rows_per_shard, num_cpus=WRITER_CPUS,
                                fn_kwargs={"directory": store.shard_dir(run_id), "storage_options": options,
                                           "schema": token_shard_schema(list(roles)), "prefix": "shard",
                                           "transform": functools.partial(add_token_metadata, run_id=run_id,
                                                                          roles=role_meta)})
            meter = Progress("tokenize", enabled=progress)
            committed_files = committed_quarantine = 0
            last_commit = time.monotonic()

            def commit(final: bool) -> None:
                nonlocal committed_files, committed_quarantine, last_commit, commits
                new_files = tracker.files[committed_files:]
                done = tracker.take_completed()
                bad = tracker.quarantined[committed_quarantine:]
                committed_quarantine = len(tracker.quarantined)
                if not (new_files or done or bad):
                    return
                ledger_rows = [{"source_uri": o["uri"], "source": o["source"], "domain": o["domain"], "etag": o["etag"],
                                "size": o["size"], "run_id": run_id, "status": "tokenized", "segments": o["segments"],
                                "audio_seconds": o["audio_seconds"], "reason": None} for o in done]
                ledger_rows += [{"source_uri": q["uri"], "source": q["source"], "domain": q["domain"], "etag": q["etag"],
                                 "size": q["size"], "run_id": run_id, "status": "quarantined", "segments": 0,
                                 "audio_seconds": 0.0, "reason": f"{q['stage']}: {q['reason']}"} for q in bad]
                store.commit(run_id, [dict(f, run_id=run_id) for f in new_files], ledger_rows,
                             info={"final": final, "objects_committed": len(ledger_rows)})
                committed_files = len(tracker.files)
                last_commit = time.monotonic()
                commits += 1

            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    meter.update(audio_seconds=row["audio_seconds"], **tracker.add(row))
                if time.monotonic() - last_commit >= cfg.tokenize.commit_interval_s:
                    commit(final=False)
            commit(final=True)
            meter.finish()
        else:
            log(f"[tokenize] nothing new: all {skipped} objects are committed under {version}")

    ledger = store.ledger()
    live = ledger.filter(pc.equal(ledger["status"], "tokenized")) if ledger.num_rows else ledger
    token_bytes: dict[str, int] = {}
    for f in tracker.files:
        import pyarrow.parquet as pq

        meta = pq.read_metadata(pa.BufferReader(storage.read_bytes(f["file"])))
        for rg in range(meta.num_row_groups):
            g = meta.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                if col.path_in_schema.endswith("_tokens"):
                    role = col.path_in_schema[: -len("_tokens")]
                    token_bytes[role] = token_bytes.get(role, 0) + col.total_compressed_size
    quarantined = list(catalog.unreadable) + tracker.quarantined
    return TokenizeSummary(
        objects=catalog.num_objects + len(catalog.unreadable), new_objects=tracker.completed_total,
        skipped_objects=skipped, segments=tracker.rows, audio_seconds=tracker.audio_seconds, quarantined=quarantined,
        output=out, token_version=version, committed_segments=int(pc.sum(live["segments"]).as_py() or 0) if live.num_rows else 0,
        committed_objects=live.num_rows, commits=commits, codebooks=codebooks, token_bytes=token_bytes,
        wall_seconds=time.monotonic() - t0)
