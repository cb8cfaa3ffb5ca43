"""The tokenisation job (`spear tokenize`): catalog -> diff -> [pass 1: fit MVQ] -> pass 2 -> shards -> commits.

1. catalog every source; find the token version (keyed by the decode settings and, for every
   configured teacher role, the teacher version and codebook shape: :func:`~spear.schemas.shards.token_version`)
   and diff against its ledger: only objects that are new, or whose etag/size changed, go on (a
   changed object's old rows are superseded). All of this runs without Ray (teacher versions come
   from fingerprints recorded in version.json, or from the weight-free teachers themselves), so a
   run with nothing new ends here, without starting Ray;
2. for each teacher role (``speech`` on every domain, ``audio`` on audio-domain data only):
   load the role's codebooks, or, the first time the role has data, reuse (``mvq.reuse_codebooks``)
   or fit them (pass 1, :mod:`spear.stages.quantize`); version.json records them;
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
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.console import console_log
from spear.cluster.ray_runtime import ray_data_without_progress_bars, ray_session
from spear.cluster.storage import Storage, StorageError, StorageOptions, normalize_uri, relative_uri
from spear.config import ConfigError, SpearConfig, TeacherConfig
from spear.pipeline.codebooks import ROLE_DOMAINS, CodebookInfo, codebook_key, recorded_codebooks, role_codebooks, role_has_data
from spear.pipeline.ledger import TokenStore, list_token_versions
from spear.pipeline.progress import Progress
from spear.schemas.ledger import VersionInfo, ledger_keys, object_keys, quarantined_entry, tokenized_entry
from spear.schemas.quarantine import is_partial
from spear.schemas.segments import CUT_METADATA_COLUMNS
from spear.schemas.shards import TOKEN_VERSION_SCHEME, token_columns, token_shard_schema, token_version
from spear.stages.catalog import Catalog, build_catalog
from spear.stages.decode import decode_dataset
from spear.stages.quantize import QuantizerEncoder
from spear.stages.writer import WRITER_CPUS, ObjectTracker, WriterStage

# Modules that load torch (teachers, the teacher stage) are imported inside the functions that use them:
# a run with nothing new (the common incremental case) finishes without loading torch (bench/startup.py).
if TYPE_CHECKING:
    from spear.stages.teacher import TeacherFootprint


@dataclass
class TokenizeSummary:
    """What `spear tokenize` did; ``to_dict()`` is the ``--json`` object.

    Every figure the job prints on stderr is read from this object, with one definition per count:

    - ``objects``: source objects listed, plus sources or objects that could not be listed;
    - ``pending_objects``: new or changed objects the ledger diff sent to pass 2 (= ``new_objects``
      + objects quarantined in pass 2 + objects a failure left unfinished);
    - ``new_objects``: objects tokenised and committed by this run;
    - ``skipped_objects``: objects already in the ledger (tokenised or quarantined) and unchanged, not read;
    - ``quarantined``: objects this run set aside (unlistable, undecodable, teacher failure), with reasons;
    - ``partial``: objects kept in part (damaged after a decodable start): tokenised, so counted in
      ``new_objects``, not in ``quarantined``; each with the reason and what was kept;
    - ``segments`` / ``audio_seconds``: segments and audio seconds tokenised by this run;
    - ``committed_objects`` / ``committed_segments``: live objects and their segments in the token version
      after the run (earlier runs' too); ``commits``: manifests this run wrote;
    - ``codebooks``: the codebooks of each role that has them (a role gets them the first time its domain has data);
    - ``token_bytes``: raw token bytes written by this run, per role;
    - ``wall_seconds``: the whole run; ``realtime_factor`` = ``audio_seconds / wall_seconds``;
    - ``ray_started``: whether the run started (or joined) Ray: false when the ledger showed nothing to do;
      ``ray_start_seconds``: starting or connecting to it (the "Ray ready in X s" line; 0 when already connected);
    - ``warnings``: what the user should act on (e.g. codebooks fitted on too few frames), also printed on stderr.
    """

    objects: int
    new_objects: int = 0
    skipped_objects: int = 0
    segments: int = 0
    audio_seconds: float = 0.0
    quarantined: list[dict] = field(default_factory=list)
    output: str = ""
    token_version: str = ""
    committed_segments: int = 0
    committed_objects: int = 0
    commits: int = 0
    codebooks: dict[str, CodebookInfo] = field(default_factory=dict)
    token_bytes: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    pending_objects: int = 0
    ray_started: bool = False
    ray_start_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    partial: list[dict] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quarantined"] = [{"uri": q["uri"], "reason": q["reason"], "stage": q["stage"]} for q in self.quarantined]
        d["partial"] = [{"uri": q["uri"], "reason": q["reason"], "stage": q["stage"]} for q in self.partial]
        d["partial_objects"] = len(self.partial)
        d["audio_hours"] = self.audio_seconds / 3600
        d["realtime_factor"] = self.realtime_factor
        return d

    def pass2_line(self) -> str:
        return (f"[tokenize] pass 2: {self.pending_objects} new or changed objects "
                f"({self.skipped_objects} already committed)")

    def done_line(self) -> str:
        kept = f"; {len(self.partial)} of them kept in part" if self.partial else ""
        return (f"[tokenize] done: {self.new_objects} of {self.pending_objects} new or changed objects tokenised "
                f"({self.segments} segments, {self.audio_seconds / 3600:.3f} h{kept}), "
                f"{len(self.quarantined)} quarantined, {self.skipped_objects} already committed; {self.wall_seconds:.1f} s, "
                f"{self.realtime_factor:.2f}x real time over the whole run")

    def human(self) -> str:
        lines = [f"token version {self.token_version} at {self.output}",
                 f"tokenised {self.new_objects} of {self.pending_objects} new or changed objects ({self.segments} "
                 f"segments, {self.audio_seconds / 3600:.3f} h) in {self.wall_seconds:.1f} s; "
                 f"{self.skipped_objects} already committed",
                 f"committed: {self.committed_objects} objects, {self.committed_segments} segments ({self.commits} commits this run)"]
        for role, cb in self.codebooks.items():
            how = "fitted now" if cb.fitted_now else (f"reused from {cb.reused_from}" if cb.reused_from else "stored")
            loss = f", held-out relative loss {cb.heldout_loss:.3f}" if cb.heldout_loss is not None else ""
            frames = f", fitted on {cb.sample_frames} frames" if cb.sample_frames is not None else ""
            lines.append(f"{role} teacher {cb.teacher} ({cb.frame_rate:g} Hz, {cb.dim}-d): codebooks {cb.version[:12]} "
                         f"x{cb.num_codebooks} ({how}{frames}{loss})")
        if self.partial:
            lines.append(f"kept in part {len(self.partial)} (their decodable part is tokenised):")
            lines += [f"  {q['uri']}: {q['reason']}" for q in self.partial]
        if self.quarantined:
            lines.append(f"quarantined {len(self.quarantined)}:")
            lines += [f"  {q['uri']}: {q['reason']}" for q in self.quarantined]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def teacher_pool_kwargs(tcfg: TeacherConfig, resources: dict[str, float], pools: int,
                        actors: Optional[int], footprint: Optional["TeacherFootprint"] = None) -> dict[str, Any]:
    """``map_batches`` resources of one of ``pools`` teacher actor pools running side by side.

    Each pool is planned over its share of the cluster (``resources`` / ``pools``): two CPU pools
    planned over the whole cluster would together hold every CPU and starve the decode tasks;
    two GPU pools on one GPU take half of it each. ``footprint``: what sizes the actors' memory
    reservation (none without it, unless the teacher sets ``memory_gb``).
    """
    from spear.stages.teacher import plan_teacher_pool

    share = {k: float(v) / pools for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
    plan = plan_teacher_pool(tcfg, resources=share, actors=actors, footprint=footprint)
    kwargs = plan.map_batches_kwargs()
    # Actors hold their CPU reservation for the whole run, GPU actors too: on a small node, whole CPUs for
    # every actor would leave none for the decode tasks feeding them and Ray Data would wait forever (a
    # 2-CPU node with one GPU: two GPU actors held both CPUs, pass 2 never started).
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


def stage_resources(cfg: SpearConfig, roles: dict[str, TeacherConfig], log, embedded: bool = True,
                    footprints: Optional[Mapping[str, "TeacherFootprint"]] = None
                    ) -> tuple[dict[str, dict[str, Any]], Any]:
    """Teacher pool ``map_batches`` kwargs per role (``footprints``: per role, what sizes its actors' memory),
    and the decode config with a reservation that fits beside them."""
    import ray

    resources = ray.cluster_resources()
    pools = {role: teacher_pool_kwargs(tcfg, resources, len(roles), cfg.tokenize.teacher_actors,
                                       (footprints or {}).get(role))
             for role, tcfg in roles.items()}
    if not embedded:
        # On a cluster a teacher actor dies mostly with its node (preemption, scale-down): let Ray Data
        # restart it as often as it takes. Embedded, a death that repeats (memory, a bad checkpoint) ends
        # the run after a few restarts (see TeacherPoolPlan.map_batches_kwargs).
        for kwargs in pools.values():
            kwargs.pop("max_restarts", None)
    for role, kwargs in pools.items():
        log(f"[tokenize] {role} teacher {roles[role].kind}: up to {kwargs['compute'].max_size} actor(s), "
            f"{kwargs.get('num_gpus', 0):g} GPU, {kwargs['num_cpus']:g} CPU"
            + (f", {kwargs['memory'] / 2**30:.1f} GiB memory" if kwargs.get("memory") else "") + " each")
    cpus = float(resources.get("CPU", 1.0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    decode_cpus = decode_task_cpus(cfg.decode.num_cpus_per_task, cpus, pools.values(), WRITER_CPUS, nodes)
    if decode_cpus < cfg.decode.num_cpus_per_task:
        log(f"[tokenize] decode tasks reserve {decode_cpus:g} CPU (of {cfg.decode.num_cpus_per_task:g} configured): "
            f"the teacher actors hold the rest of {cpus:g} on {max(1, nodes)} node(s)")
    return pools, cfg.decode.model_copy(update={"num_cpus_per_task": decode_cpus})


def teacher_footprint(tcfg: TeacherConfig, fingerprint: dict[str, Any], describe: dict[str, Any],
                      max_segment_seconds: float, sample_rate: int) -> "TeacherFootprint":
    """What sizes a teacher actor's memory (:func:`~spear.stages.teacher.teacher_actor_memory`), from what the
    run knows before any actor starts: the checkpoint's file sizes (its fingerprint; a wheel's weight file
    without a path), the teacher's frame rate and dim (its description) and the decode settings."""
    from spear.models.teachers.registry import packaged_weights_path
    from spear.stages.teacher import TeacherFootprint

    if "files" in fingerprint:
        weight_bytes = sum(int(size or 0) for _, size, _ in fingerprint["files"])
    else:
        path = packaged_weights_path(tcfg.kind)
        weight_bytes = path.stat().st_size if path is not None else 0
    return TeacherFootprint(weight_bytes=weight_bytes, frame_rate=float(describe["frame_rate"]),
                            dim=int(describe["dim"]), max_segment_seconds=max_segment_seconds, sample_rate=sample_rate)


def _describe_teacher(cfg: TeacherConfig, options: StorageOptions | None) -> dict[str, Any]:
    from spear.stages.teacher_loading import load_teacher

    teacher = load_teacher(cfg, storage=Storage(options) if options else None, device="cpu")
    return teacher.describe()


def add_token_metadata(table: pa.Table, *, run_id: str, roles: dict[str, Optional[dict[str, Any]]]) -> pa.Table:
    """Writer transform: run id and, per role, the token metadata columns; tokens null where a role does not
    apply (and all of a role's columns null when ``roles[role]`` is None: it did not run)."""
    n = table.num_rows
    table = table.append_column("run_id", pa.array([run_id] * n, pa.string()))
    domains = table["domain"]
    for role, meta in roles.items():
        if meta is None or f"{role}_tokens" not in table.column_names:
            # a role that did not run here (its domain has no rows in this run): its columns are null
            for f in token_columns(role):
                table = table.append_column(f.name, pa.nulls(n, f.type)) if f.name not in table.column_names \
                    else table.set_column(table.schema.get_field_index(f.name), f.name, pa.nulls(n, f.type))
            continue
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
    # A batch of file rows has all-null cut metadata; two teacher stages in a row (numpy batches) hand such a
    # column back as float NaN (null type -> float32), which the shard schema's cast would write as "nan".
    for name in CUT_METADATA_COLUMNS:
        if name in table.column_names and (pa.types.is_null(table[name].type) or pa.types.is_floating(table[name].type)):
            table = table.set_column(table.schema.get_field_index(name), name, pa.nulls(n, pa.string()))
    return table


def diff_catalog(objects: pa.Table, ledger: pa.Table) -> tuple[pa.Table, int, pa.Table]:
    """(objects to tokenise: new or changed, number already committed and unchanged, the objects to tokenise
    whose key the ledger holds under another URI: ``uri`` and ``previous_uri``).

    An object is done when the ledger holds an entry with its key (:func:`~spear.schemas.ledger.object_keys`:
    the same object reached through another spelling or location, a moved folder, keeps it) or, for entries
    written before keys existed, its URI, and its etag and size. One whose key is there under another URI with another
    etag (the corpus uploaded to S3) is tokenised again and its new entry replaces the old one, so its
    segments are not trained on twice. Matched in Arrow (hash joins), not in Python: a million-cut
    catalog would otherwise make several Python objects per row.

    >>> objs = pa.table({"uri": ["/c/a", "/c/b", "/c/c", "s3://k/c/d", "s3://k/c/e"], "source": ["c"] * 5,
    ...                  "relative_path": ["a", "b", "c", "d", "e"], "etag": ["1", "2", "3", "4", "5"],
    ...                  "size": [1, 2, 3, 4, 5]})
    >>> led = pa.table({"source_uri": ["/c/a", "/c/b", "/old/c/d", "/old/c/e"],
    ...                 "object_key": [None, "c/b", "c/d", "c/e"], "etag": ["1", "x", "4", "y"], "size": [1, 2, 4, 5]})
    >>> todo, done, moved = diff_catalog(objs, led)
    >>> todo["uri"].to_pylist(), done, moved.to_pylist()
    (['/c/b', '/c/c', 's3://k/c/e'], 2, [{'uri': 's3://k/c/e', 'previous_uri': '/old/c/e'}])
    """
    no_moves = pa.table({"uri": pa.array([], pa.string()), "previous_uri": pa.array([], pa.string())})
    if ledger.num_rows == 0 or objects.num_rows == 0:
        return objects, 0, no_moves
    row = pa.array(np.arange(objects.num_rows, dtype=np.int64))
    keys = object_keys(objects)
    cat = pa.table({"key": keys, "uri": objects["uri"], "etag": objects["etag"], "size": objects["size"], "_row": row})
    known = pa.table({"key": ledger_keys(ledger), "etag": ledger["etag"], "size": ledger["size"],
                      "previous_uri": ledger["source_uri"]})
    # a semi join gives each catalog row once, however many ledger entries match it; the URI join finds the
    # entries written before keys existed (their key is their URI)
    hits = [cat.join(known, keys=[k, "etag", "size"], right_keys=["key", "etag", "size"], join_type="left semi",
                     use_threads=False)["_row"] for k in ("key", "uri")]
    hit = pc.unique(pa.chunked_array([c for h in hits for c in h.chunks], type=pa.int64()).combine_chunks())
    pending = pc.invert(pc.is_in(row, value_set=hit))
    todo, cat = objects.filter(pending), cat.filter(pending)
    moved = cat.select(["key", "uri"]).join(known.select(["key", "previous_uri"]), keys="key", join_type="inner",
                                                use_threads=False)
    moved = moved.filter(pc.not_equal(moved["uri"], moved["previous_uri"])).select(["uri", "previous_uri"])
    return todo, len(hit), moved.sort_by("uri")


def moved_warning(moved: pa.Table) -> str:
    """The warning of a run that tokenises again objects committed before from another location."""
    first = moved.slice(0, 1).to_pylist()[0]
    return (f"{moved.num_rows} object(s) were committed before from another location (e.g. {first['uri']} as "
            f"{first['previous_uri']}): same source name and path, taken as the same corpus moved or copied, so "
            "this run's rows replace the earlier ones at its first commit; if it is another corpus, stop the run "
            "and give its source another name (corpus.sources[].name)")


def teacher_fingerprint(tcfg: TeacherConfig, storage: Storage) -> dict[str, Any]:
    """What identifies a teacher's version without loading it: kind, layer, our implementation version
    and, for a checkpoint, the names, sizes and etags of its files (a rewritten checkpoint changes it)."""
    from spear.models.teachers.base import IMPLEMENTATION_VERSION

    fp: dict[str, Any] = {"kind": tcfg.kind, "layer": tcfg.layer, "implementation": IMPLEMENTATION_VERSION}
    if tcfg.path:
        base = normalize_uri(tcfg.path)
        fp["files"] = sorted([relative_uri(base, e.uri) or e.uri.rsplit("/", 1)[-1], e.size, e.etag]
                             for e in storage.list_files(base))
    return fp


def resolve_teachers(roles: dict[str, TeacherConfig], out: str, storage: Storage, options: StorageOptions
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], list[str], list[str]]:
    """(role -> teacher description, role -> fingerprint, roles still to describe, token versions of the
    first scheme under ``out``), without Ray.

    A fingerprint recorded in a version.json under ``out`` gives its description; weight-free
    teachers are described here (cheap); a checkpoint not seen before is left to a Ray task.
    """
    known: dict[str, dict[str, Any]] = {}
    legacy = []
    for v in list_token_versions(out, storage):
        try:
            info = TokenStore(out, v, storage).version_info()
        except (FileNotFoundError, ValueError):
            continue
        if "scheme" not in info:
            legacy.append(v)
        for entry in (info.get("teacher_fingerprints") or {}).values():
            known[json.dumps(entry["fingerprint"], sort_keys=True)] = entry["describe"]
    descs, fps, missing = {}, {}, []
    for role, tcfg in roles.items():
        fps[role] = teacher_fingerprint(tcfg, storage)
        hit = known.get(json.dumps(fps[role], sort_keys=True))
        if hit is not None:
            descs[role] = hit
        elif not tcfg.path:
            descs[role] = _describe_teacher(tcfg, options)
        else:
            missing.append(role)
    return descs, fps, missing, legacy


def _open_version(out: str, storage: Storage, cfg: SpearConfig, decode_settings: dict[str, Any],
                  roles: dict[str, TeacherConfig], descs: dict[str, dict[str, Any]], objects: pa.Table) -> "OpenedVersion":
    """The token version ``descs`` and the settings key, and what of ``objects`` it still lacks."""
    # teacher version, codebook shape and (when off) the embedding normalisation: raw codebooks make another version
    key = {r: codebook_key(cfg, r, roles[r], descs[r]["version"]) for r in roles}
    version = token_version(decode_settings, key)
    store = TokenStore(out, version, storage)
    try:
        info = store.version_info()
    except FileNotFoundError:
        info = None
    todo, skipped, moved = diff_catalog(objects, store.ledger())
    return OpenedVersion(key=key, version=version, store=store, info=info, todo=todo, skipped=skipped, moved=moved)


def _version_info(version: str, decode_settings: dict[str, Any], key: dict[str, Any], roles: dict[str, TeacherConfig],
                  codebooks: dict[str, CodebookInfo], descs: dict[str, dict[str, Any]],
                  fingerprints: dict[str, dict[str, Any]]) -> VersionInfo:
    """version.json: what the token version is (``key``), the codebooks of the roles fitted so far
    (``teachers``, read by status and training) and the teacher fingerprints (a later run knows
    the teacher versions without loading the teachers)."""
    return {"token_version": version, "scheme": TOKEN_VERSION_SCHEME, "decode": decode_settings, "key": key,
            "teachers": {r: {**asdict(cb), "config": roles[r].model_dump(mode="json"), "domains": ROLE_DOMAINS[r]}
                         for r, cb in codebooks.items()},
            "teacher_fingerprints": {r: {"fingerprint": fingerprints[r], "describe": descs[r]} for r in roles}}


def run_tokenize(cfg: SpearConfig, *, progress: bool = True, catalog: Catalog | None = None) -> TokenizeSummary:
    """Run the tokenisation job described by ``cfg``; see the module docstring."""
    if not cfg.corpus.sources and catalog is None:
        raise ConfigError("no corpus sources: give --input URI[,URI...] --domain speech|audio, "
                          "or list corpus.sources in the config")
    t0 = time.monotonic()
    log = console_log(progress)
    options = StorageOptions.from_config(cfg.storage)
    storage = Storage(options)
    out = normalize_uri(cfg.output)  # one spelling for the driver and the Ray workers
    storage.check_access(out)
    if catalog is None:
        catalog = build_catalog(cfg.corpus.sources, storage)
    if catalog.num_objects == 0 and catalog.unreadable:
        raise StorageError("no source could be listed: " + "; ".join(f"{u['uri']}: {u['reason']}" for u in catalog.unreadable))
    summary = TokenizeSummary(objects=catalog.num_objects + len(catalog.unreadable), output=out)

    # Every configured role is part of the token version, whether or not its domain has data yet:
    # its codebooks are fitted the first time it has, so new audio-domain data extends the dataset.
    roles: dict[str, TeacherConfig] = {"speech": cfg.teachers.speech}
    if cfg.teachers.audio is not None:
        roles["audio"] = cfg.teachers.audio
    decode_settings = {"sample_rate": cfg.decode.sample_rate, "max_segment_seconds": cfg.decode.max_segment_seconds,
                       "min_segment_seconds": cfg.decode.min_segment_seconds}
    # What there is to do is decided before Ray starts: a run with nothing new never starts it.
    descs, fingerprints, missing, legacy = resolve_teachers(roles, out, storage, options)
    opened = None if missing else _open_version(out, storage, cfg, decode_settings, roles, descs, catalog.objects)
    committer: Optional[ShardCommitter] = None
    if opened is not None and opened.todo.num_rows == 0:
        log(f"[tokenize] nothing new: all {opened.skipped} objects are committed under {opened.version}")
    else:
        import ray

        # ray_session says "starting Ray ..." at once (with the job's progress setting)
        with ray_session(cfg.ray, dashboard=False, announce=log) as rinfo:  # Ray Data only: no dashboard (see ray_runtime)
            summary.ray_started, summary.ray_start_seconds = True, float(getattr(rinfo, "start_seconds", 0.0))
            ray_data_without_progress_bars()
            if missing:
                describe = ray.remote(num_cpus=0.5)(_describe_teacher)
                descs.update(zip(missing, ray.get([describe.remote(roles[r], options) for r in missing])))
                opened = _open_version(out, storage, cfg, decode_settings, roles, descs, catalog.objects)
            if opened.todo.num_rows == 0:
                log(f"[tokenize] nothing new: all {opened.skipped} objects are committed under {opened.version}")
            else:
                def plan_stages(active: dict[str, TeacherConfig]):
                    footprints = {r: teacher_footprint(t, fingerprints[r], descs[r], cfg.decode.max_segment_seconds,
                                                       cfg.decode.sample_rate) for r, t in active.items()}
                    return stage_resources(cfg, active, log, rinfo.embedded, footprints)

                summary.codebooks = role_codebooks(cfg, roles, descs, opened.todo, catalog.objects, out, opened.version,
                                                   opened.info, storage, options, rinfo, log, summary.warnings,
                                                   plan_stages)
                new_info = _version_info(opened.version, decode_settings, opened.key, roles, summary.codebooks, descs,
                                         fingerprints)
                info = opened.info
                if info is None or set(info.get("teachers") or {}) != set(new_info["teachers"]) \
                        or info.get("teacher_fingerprints") != new_info["teacher_fingerprints"]:
                    opened.store.write_version_info(new_info, replace=True)
                run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
                summary.pending_objects, summary.skipped_objects = opened.todo.num_rows, opened.skipped
                log(f"{summary.pass2_line()}, run {run_id}")
                if opened.moved.num_rows:
                    summary.warnings.append(moved_warning(opened.moved))
                    log(f"[tokenize] warning: {summary.warnings[-1]}")
                ds = _pass2_dataset(cfg, roles, summary.codebooks, opened, run_id, options, plan_stages)
                committer = ShardCommitter(opened.store, run_id,
                                           dict(zip(opened.todo["uri"].to_pylist(),
                                                    object_keys(opened.todo).to_pylist())))
                meter = Progress("tokenize", enabled=progress)
                try:
                    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                        for row in batch.to_pylist():
                            meter.update(audio_seconds=row["audio_seconds"], **committer.tracker.add(row))
                        if time.monotonic() - committer.last_commit >= cfg.tokenize.commit_interval_s:
                            committer.commit(final=False)
                except BaseException as exc:  # failed, Ctrl-C, or SIGTERM (`spear stop`: ray.init makes it SystemExit)
                    committer.salvage(exc, log)
                    raise
                committer.commit(final=True)

    _finish_summary(summary, opened, committer, catalog, legacy, out, storage, log)
    summary.wall_seconds = time.monotonic() - t0
    log(summary.done_line())
    return summary


@dataclass
class OpenedVersion:
    """The token version a run writes into, and what of the catalog it still has to tokenise."""

    key: dict[str, Any]
    version: str
    store: TokenStore
    info: Optional[dict[str, Any]]   # its version.json (None before the first commit)
    todo: pa.Table                   # objects new or changed since the ledger
    skipped: int                     # objects already committed and unchanged
    moved: pa.Table                  # objects of todo committed before from another URI (uri, previous_uri)


def _pass2_dataset(cfg: SpearConfig, roles: dict[str, TeacherConfig], codebooks: dict[str, CodebookInfo],
                   opened: OpenedVersion, run_id: str, options: StorageOptions, plan_stages):
    """Pass 2 on Ray Data: decode -> each active role's teacher + MVQ (one actor each) -> shard writer."""
    from spear.stages.teacher import map_teacher_stage

    # only the teachers whose domains have rows in this run
    active = {r: t for r, t in roles.items() if r in codebooks and role_has_data(opened.todo, r)}
    pools, decode_cfg = plan_stages(active)
    ds = decode_dataset(opened.todo, decode_cfg, options)
    for role, tcfg in active.items():
        ds = map_teacher_stage(ds, pools[role], teacher=tcfg, column_prefix=role, storage_options=options,
                               encode=QuantizerEncoder(codebooks[role].uri, options), only_domains=ROLE_DOMAINS[role])
    role_meta = {r: ({"domains": ROLE_DOMAINS[r], "num_codebooks": codebooks[r].num_codebooks,
                      "frame_rate": codebooks[r].frame_rate, "codebook": codebooks[r].version}
                     if r in active else None) for r in roles}
    per_row = cfg.decode.max_segment_seconds * cfg.tokenize.flac_bytes_per_second
    rows_per_shard = max(1, int(cfg.tokenize.shard_target_mb * 1e6 / per_row))
    writer = WriterStage(opened.store.shard_dir(run_id), token_shard_schema(list(roles)), options, prefix="shard",
                         transform=functools.partial(add_token_metadata, run_id=run_id, roles=role_meta))
    return ds.map_batches(writer, batch_format="pyarrow", batch_size=rows_per_shard, num_cpus=WRITER_CPUS)


class ShardCommitter:
    """Commits what pass 2 finished to the token version's ledger, one manifest per commit.

    The driver feeds every writer row to ``tracker`` and calls :meth:`commit` every
    ``tokenize.commit_interval_s`` and at the end; each commit names the shard files written since
    the last one and the objects whose segments are all in them. A run that fails or is stopped
    (Ctrl-C, SIGTERM) commits what it finished on its way out (:meth:`salvage`); a killed driver
    loses at most one interval. An object kept in part is committed as tokenised, with its note as
    the reason.
    """

    def __init__(self, store: TokenStore, run_id: str, keys: Optional[Mapping[str, str]] = None):
        self.store, self.run_id = store, run_id
        self.keys = keys or {}  # uri -> object key (object_keys) of the objects this run tokenises
        self.tracker = ObjectTracker()
        self.commits = 0
        self.last_commit = time.monotonic()
        self._files_done = self._quarantine_done = 0
        self._partial_notes: dict[str, str] = {}

    def commit(self, final: bool) -> int:
        """Commit what finished since the last commit; returns the objects committed (0: nothing to commit)."""
        tracker = self.tracker
        new_files = tracker.files[self._files_done:]
        done = tracker.take_completed()
        bad = tracker.quarantined[self._quarantine_done:]
        self._quarantine_done = len(tracker.quarantined)
        # An object kept in part is tokenized (a "quarantined" entry would hide its rows): its note
        # becomes the reason of its "tokenized" entry.
        self._partial_notes.update({q["uri"]: f"{q['stage']}: {q['reason']}" for q in bad if is_partial(q)})
        bad = [q for q in bad if not is_partial(q)]
        if not (new_files or done or bad):
            return 0
        run_id = self.run_id
        ledger_rows = [tokenized_entry(o, run_id, self._partial_notes.get(o["uri"]), self.keys.get(o["uri"]))
                       for o in done]
        ledger_rows += [quarantined_entry(q, run_id, self.keys.get(q["uri"])) for q in bad]
        # counted as done before the write: a commit stopped half-way (Ctrl-C) is never written twice by
        # salvage(); what it did not write is tokenised again by the re-run
        self._files_done = len(tracker.files)
        self.store.commit(run_id, [dict(f, run_id=run_id) for f in new_files], ledger_rows,
                          info={"final": final, "objects_committed": len(ledger_rows)})
        self.last_commit = time.monotonic()
        self.commits += 1
        return len(ledger_rows)

    def salvage(self, exc: BaseException, log: Callable[[str], None]) -> None:
        """After pass 2 stopped on ``exc``: commit what it finished, so that a re-run starts after it.

        The shard files the tracker has are whole (a writer reports a file once written); objects
        still in flight are left to the re-run. Never raises: ``exc`` is the error to report.
        """
        why = ("interrupted" if isinstance(exc, KeyboardInterrupt) else
               "terminated" if isinstance(exc, SystemExit) else "failed")
        try:
            n = self.commit(final=False)
        except Exception as commit_exc:  # noqa: BLE001 - e.g. the storage that failed the run
            log(f"[tokenize] the run {why}; committing what it had finished failed too: {commit_exc}")
            return
        if n:
            log(f"[tokenize] the run {why}: committed the {n} object(s) it had finished since the last commit; "
                "a re-run goes on from there")


def _token_bytes_written(files: list[dict[str, Any]], storage: Storage) -> dict[str, int]:
    """Compressed bytes of each role's token column in the shard files a run wrote (their Parquet footers)."""
    totals: dict[str, int] = {}
    for f in files:
        meta = pq.read_metadata(pa.BufferReader(storage.read_bytes(f["file"])))
        for rg in range(meta.num_row_groups):
            g = meta.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                if col.path_in_schema.endswith("_tokens"):
                    role = col.path_in_schema[: -len("_tokens")]
                    totals[role] = totals.get(role, 0) + col.total_compressed_size
    return totals


def _finish_summary(summary: TokenizeSummary, opened: OpenedVersion, committer: Optional[ShardCommitter],
                    catalog: Catalog, legacy: list[str], out: str, storage: Storage, log) -> None:
    """Fill the summary's counts from what was committed (the ledger) and what this run did (the committer)."""
    summary.token_version = opened.version
    summary.skipped_objects = opened.skipped
    if legacy:
        summary.warnings.append(
            f"{out} also holds token versions written before a version covered every teacher role "
            f"({', '.join(legacy)}); this run's rows are in {opened.version}. `spear train` reads one version: set "
            f"train.token_version, or tokenise the whole corpus into a new --output to have it in one")
        log(f"[tokenize] warning: {summary.warnings[-1]}")
    ledger = opened.store.ledger()
    live = ledger.filter(pc.equal(ledger["status"], "tokenized")) if ledger.num_rows else ledger
    tracker = committer.tracker if committer is not None else ObjectTracker()
    summary.token_bytes.update(_token_bytes_written(tracker.files, storage))
    if not summary.codebooks and opened.info:
        summary.codebooks = recorded_codebooks(opened.info, out)
    summary.quarantined = list(catalog.unreadable) + [q for q in tracker.quarantined if not is_partial(q)]
    summary.partial = [q for q in tracker.quarantined if is_partial(q)]
    summary.new_objects, summary.segments, summary.audio_seconds = tracker.completed_total, tracker.rows, tracker.audio_seconds
    summary.committed_segments = int(pc.sum(live["segments"]).as_py() or 0) if live.num_rows else 0
    summary.committed_objects = live.num_rows
    summary.commits = committer.commits if committer is not None else 0
