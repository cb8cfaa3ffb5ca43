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
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageOptions, join_uri, normalize_uri, relative_uri, resolve_uri
from spear.config import ConfigError, SpearConfig, TeacherConfig
from spear.pipeline.ledger import TokenStore, list_token_versions
from spear.pipeline.progress import Progress
from spear.schemas.shards import TOKEN_VERSION_SCHEME, token_columns, token_shard_schema, token_version
from spear.stages.catalog import Catalog, build_catalog
from spear.stages.writer import ObjectTracker, write_batch

# CPU reservation of a shard-writer task (mostly waiting on storage).
WRITER_CPUS = 0.25
ROLE_DOMAINS: dict[str, Optional[tuple[str, ...]]] = {"speech": None, "audio": ("audio",)}


@dataclass
class CodebookInfo:
    """The codebooks one teacher role uses in a token version."""

    uri: str
    version: str
    teacher: str
    teacher_version: str
    num_codebooks: int
    frame_rate: float
    dim: int
    fitted_now: bool                       # fitted (pass 1) by this run
    heldout_loss: Optional[float] = None
    sample_frames: Optional[int] = None    # frames the codebooks were fitted on
    heldout_frames: Optional[int] = None
    reused_from: Optional[str] = None      # the mvq.reuse_codebooks artefact they were copied from


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


def stage_resources(cfg: SpearConfig, roles: dict[str, TeacherConfig], log,
                    embedded: bool = True) -> tuple[dict[str, dict[str, Any]], Any]:
    """Teacher pool ``map_batches`` kwargs per role, and the decode config with a reservation that fits beside them."""
    import ray

    resources = ray.cluster_resources()
    pools = {role: teacher_pool_kwargs(tcfg, resources, len(roles), cfg.tokenize.teacher_actors)
             for role, tcfg in roles.items()}
    if not embedded:
        # On a cluster a teacher actor dies mostly with its node (preemption, scale-down): let Ray Data
        # restart it and the run go on. Embedded, a death repeats (memory, a bad checkpoint), so it ends
        # the run at once (see TeacherPoolPlan.map_batches_kwargs).
        for kwargs in pools.values():
            kwargs.pop("max_restarts", None)
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


def _role_has_data(objects: pa.Table, role: str) -> bool:
    domains = ROLE_DOMAINS[role]
    if objects.num_rows == 0 or domains is None:
        return objects.num_rows > 0
    return bool(pc.any(pc.is_in(objects["domain"], value_set=pa.array(list(domains)))).as_py())


def _codebook_shape(cfg: SpearConfig, role: str) -> tuple[int, int]:
    return (cfg.mvq.speech_codebooks if role == "speech" else cfg.mvq.audio_codebooks), cfg.mvq.codebook_size


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


def _ways_on(role: str, frames: int, codebook_size: int, per_entry: int, capped: bool, cfg: SpearConfig) -> list[str]:
    from spear.stages.quantize import largest_codebook_size

    ways = []
    if capped:
        ways.append(f"sample more frames (--set mvq.sample_frames={4 * cfg.mvq.sample_frames}; now {cfg.mvq.sample_frames})")
    ways.append(f"add {'audio-domain ' if ROLE_DOMAINS[role] else ''}data")
    k = largest_codebook_size(frames, per_entry)
    if k and k < codebook_size:
        ways.append(f"choose smaller codebooks (--set mvq.codebook_size={k}: a new token version)")
    return ways


def _too_few_frames(role: str, desc: dict[str, Any], sample, codebook_size: int, cfg: SpearConfig) -> ConfigError:
    from spear.stages.quantize import SOUND_FRAMES_PER_ENTRY

    n, per = int(sample.train.shape[0]), cfg.mvq.min_frames_per_entry
    ways = _ways_on(role, n, codebook_size, per, n >= cfg.mvq.sample_frames, cfg)
    if n // codebook_size >= 1:
        ways.append(f"lower the minimum (--set mvq.min_frames_per_entry={n // codebook_size}: poorer codebooks, "
                    f"with a warning)")
    ways.append("reuse codebooks fitted elsewhere for the same teacher version "
                "(--set mvq.reuse_codebooks=URI of a token dataset or codebook folder)")
    return ConfigError(
        f"too little data to fit the {role} teacher's codebooks ({desc['name']} {desc['version'][:12]}): "
        f"{n} frames sampled from {sample.segments} segments ({sample.audio_seconds:.0f} s of audio), and "
        f"{codebook_size}-entry codebooks need at least {per * codebook_size} ({per} per entry; "
        f"{SOUND_FRAMES_PER_ENTRY * codebook_size} for a sound fit). Ways on: " + "; ".join(ways))


def _few_frames_warning(role: str, cb: CodebookInfo, codebook_size: int, capped: bool, cfg: SpearConfig) -> Optional[str]:
    """A warning when ``cb`` was fitted on fewer than SOUND_FRAMES_PER_ENTRY frames per codebook entry."""
    from spear.stages.quantize import SOUND_FRAMES_PER_ENTRY

    if cb.sample_frames is None or cb.sample_frames >= SOUND_FRAMES_PER_ENTRY * codebook_size:
        return None
    # a token version keeps its codebooks: better ones go to a new --output
    ways = [w + " and tokenise into a new --output" if w.startswith("add") else w
            for w in _ways_on(role, cb.sample_frames, codebook_size, SOUND_FRAMES_PER_ENTRY, capped, cfg)]
    ways.append("reuse codebooks fitted on more data (--set mvq.reuse_codebooks=URI)")
    return (f"{role} codebooks {cb.version[:12]} ({cb.num_codebooks}x{codebook_size}) were fitted on {cb.sample_frames} "
            f"frames; a sound fit needs at least {SOUND_FRAMES_PER_ENTRY * codebook_size} ({SOUND_FRAMES_PER_ENTRY} per "
            f"entry, as faiss' k-means asks for 39 or more per centroid), so the tokens may be poor. To do better: "
            + "; ".join(ways))


def _load_codebooks(role: str, uri: str, desc: dict[str, Any], shape: tuple[int, int], storage: Storage,
                    recorded: Optional[dict[str, Any]], version: str) -> Optional[CodebookInfo]:
    """The codebooks stored at ``uri`` (None when there are none), checked against the teacher and
    against the codebooks ``version.json`` recorded for the role (a token version never changes them)."""
    from spear.models.mvq import MultiCodebookQuantizer
    from spear.models.mvq.artefact import META_NAME

    if not storage.exists(join_uri(uri, META_NAME)):
        if recorded:
            raise ConfigError(f"token version {version} was tokenised with {role} codebooks {recorded['version'][:12]}, "
                              f"which are no longer at {uri}: restore them, or tokenise into a new --output")
        return None
    try:
        q = MultiCodebookQuantizer.load(uri, storage=storage)
        q.check_compatible(teacher_id=desc["version"], dim=int(desc["dim"]), num_codebooks=shape[0],
                           codebook_size=shape[1])
    except ValueError as exc:
        raise ConfigError(f"{role} codebooks at {uri}: {exc}") from None
    if recorded and recorded["version"] != q.version:
        raise ConfigError(f"{uri} holds {role} codebooks {q.version[:12]}, but token version {version} was tokenised "
                          f"with {recorded['version'][:12]}: restore those, or tokenise into a new --output")
    meta = q.metadata
    loss = meta.get("heldout_relative_loss")
    return CodebookInfo(uri=uri, version=q.version, teacher=desc["name"], teacher_version=desc["version"],
                        num_codebooks=shape[0], frame_rate=float(desc["frame_rate"]), dim=int(desc["dim"]),
                        fitted_now=False, heldout_loss=loss if loss is not None else meta.get("train_relative_loss"),
                        sample_frames=meta.get("training_frames"), heldout_frames=meta.get("heldout_frames"),
                        reused_from=(recorded or {}).get("reused_from"))


def _reuse_codebooks(role: str, source: str, uri: str, desc: dict[str, Any], shape: tuple[int, int],
                     storage: Storage, version: str) -> CodebookInfo:
    """Copy the artefact of ``source`` (a codebook folder, or a folder / token dataset holding several)
    that fits this teacher version and shape to ``uri``, so the dataset stays self-contained."""
    from spear.cluster.storage import StorageError
    from spear.models.mvq.artefact import META_NAME, TENSORS_NAME

    source = normalize_uri(source)
    try:
        if storage.exists(join_uri(source, META_NAME)):
            metas = [join_uri(source, META_NAME)]
        else:
            base = join_uri(source, "codebooks") if storage.exists(join_uri(source, "codebooks")) else source
            metas = [e.uri for e in storage.list_files(base, extensions=["json"]) if e.uri.endswith("/" + META_NAME)]
    except StorageError as exc:
        raise ConfigError(f"mvq.reuse_codebooks {source}: {exc}") from None
    seen = []
    for m in metas:
        try:
            meta = json.loads(storage.read_text(m))
        except (FileNotFoundError, ValueError):
            continue
        seen.append(f"{str(meta.get('teacher_id'))[:12]} {meta.get('num_codebooks')}x{meta.get('codebook_size')}")
        if (meta.get("teacher_id"), meta.get("num_codebooks"), meta.get("codebook_size"), meta.get("dim")) != \
                (desc["version"], shape[0], shape[1], int(desc["dim"])):
            continue
        folder = m[: -len(META_NAME)].rstrip("/")
        for name in (TENSORS_NAME, META_NAME):  # metadata last: its presence marks a complete artefact
            storage.write_bytes(join_uri(uri, name), storage.read_bytes(join_uri(folder, name)))
        cb = _load_codebooks(role, uri, desc, shape, storage, None, version)
        cb.reused_from = folder
        return cb
    raise ConfigError(f"mvq.reuse_codebooks {source} has no {role} codebooks for teacher {desc['name']} "
                      f"{desc['version'][:12]} with {shape[0]}x{shape[1]} (it holds: {'; '.join(seen) or 'none'}): "
                      f"codebooks are reusable only for the same teacher version and shape")


def _fit_codebooks(cfg: SpearConfig, role: str, tcfg: TeacherConfig, desc: dict[str, Any], objects: pa.Table,
                   uri: str, storage: Storage, options: StorageOptions, rinfo, log) -> tuple[CodebookInfo, bool]:
    """Pass 1 for one role: (codebooks fitted and saved at ``uri``, whether the sample hit mvq.sample_frames)."""
    from spear.stages.quantize import fit_quantizer, sample_teacher_frames

    num_codebooks, size = _codebook_shape(cfg, role)
    log(f"[tokenize] pass 1: fitting {role} codebooks for teacher {desc['name']} ({desc['version'][:12]})")
    pools, decode_cfg = stage_resources(cfg, {role: tcfg}, log, rinfo.embedded)
    sample = sample_teacher_frames(objects, tcfg, decode_cfg, options, sample_frames=cfg.mvq.sample_frames,
                                   heldout_fraction=cfg.mvq.heldout_fraction, seed=cfg.mvq.seed, dim=int(desc["dim"]),
                                   frame_rate=float(desc["frame_rate"]), domains=ROLE_DOMAINS[role], progress=log,
                                   pool_kwargs=pools[role])
    if sample.train.shape[0] < cfg.mvq.min_frames_per_entry * size:  # checked here: a GPU task would wrap the error
        raise _too_few_frames(role, desc, sample, size, cfg)
    extra = {"teacher": desc["name"], "teacher_kind": tcfg.kind, "frame_rate": float(desc["frame_rate"]), "role": role,
             "sample_segments": sample.segments, "sample_audio_seconds": sample.audio_seconds,
             "sample_sources": sample.sources}
    fit_kwargs = dict(num_codebooks=num_codebooks, codebook_size=size, seed=cfg.mvq.seed,
                      teacher_id=desc["version"], layer=tcfg.layer, extra=extra,
                      min_frames_per_entry=cfg.mvq.min_frames_per_entry)
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
    cb = CodebookInfo(uri=uri, version=q.version, teacher=desc["name"], teacher_version=desc["version"],
                      num_codebooks=num_codebooks, frame_rate=float(desc["frame_rate"]), dim=int(desc["dim"]),
                      fitted_now=True, heldout_loss=loss,
                      # the frames k-means saw (the sample less the fit's own validation share), as the artefact says
                      sample_frames=int(q.metadata.get("training_frames") or sample.train.shape[0]),
                      heldout_frames=int(q.metadata.get("heldout_frames") or sample.heldout.shape[0]))
    log(f"[tokenize] {role} codebooks {cb.version[:12]}: relative reconstruction loss {cb.heldout_loss:.4f} "
        f"on {cb.heldout_frames} held-out frames ({cb.sample_frames} fitted)")
    return cb, sample.train.shape[0] >= cfg.mvq.sample_frames


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


def _open_version(out: str, storage: Storage, cfg: SpearConfig, decode_settings: dict[str, Any],
                  roles: dict[str, TeacherConfig], descs: dict[str, dict[str, Any]], objects: pa.Table):
    """(key, token version, its store, its version.json or None, objects to tokenise, objects already done)."""
    key = {r: dict(zip(("teacher", "num_codebooks", "codebook_size"), (descs[r]["version"], *_codebook_shape(cfg, r))))
           for r in roles}
    version = token_version(decode_settings, key)
    store = TokenStore(out, version, storage)
    try:
        info = store.version_info()
    except FileNotFoundError:
        info = None
    todo, skipped = diff_catalog(objects, store.ledger())
    return key, version, store, info, todo, skipped


def _role_codebooks(cfg: SpearConfig, roles: dict[str, TeacherConfig], descs: dict[str, dict[str, Any]], todo: pa.Table,
                    objects: pa.Table, out: str, version: str, info: Optional[dict[str, Any]], storage: Storage,
                    options: StorageOptions, rinfo, log, warnings: list[str]) -> dict[str, CodebookInfo]:
    """The codebooks of every role that has them: stored ones, and for a role whose domain has data
    in ``todo`` for the first time, reused (mvq.reuse_codebooks) or fitted (pass 1) now."""
    from spear.stages.quantize import codebook_uri

    recorded = (info or {}).get("teachers") or {}
    codebooks: dict[str, CodebookInfo] = {}
    for role, tcfg in roles.items():
        has_data = _role_has_data(todo, role)
        if role not in recorded and not has_data:
            continue  # no data for this role yet: no codebooks in the version (training skips its head)
        shape = _codebook_shape(cfg, role)
        uri = codebook_uri(out, role, descs[role]["version"], *shape)
        cb = _load_codebooks(role, uri, descs[role], shape, storage, recorded.get(role), version)
        if cb is None and has_data:
            capped = False
            if cfg.mvq.reuse_codebooks:
                cb = _reuse_codebooks(role, cfg.mvq.reuse_codebooks, uri, descs[role], shape, storage, version)
                log(f"[tokenize] {role} codebooks {cb.version[:12]} reused from {cb.reused_from}")
            else:
                cb, capped = _fit_codebooks(cfg, role, tcfg, descs[role], objects, uri, storage, options, rinfo, log)
            warning = _few_frames_warning(role, cb, shape[1], capped, cfg)
            if warning:
                warnings.append(warning)
                log(f"[tokenize] warning: {warning}")
        if cb is not None:
            codebooks[role] = cb
    return codebooks


def _version_info(version: str, decode_settings: dict[str, Any], key: dict[str, Any], roles: dict[str, TeacherConfig],
                  codebooks: dict[str, CodebookInfo], descs: dict[str, dict[str, Any]],
                  fingerprints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """version.json: what the token version is (``key``), the codebooks of the roles fitted so far
    (``teachers``, read by status and training) and the teacher fingerprints (a later run knows
    the teacher versions without loading the teachers)."""
    return {"token_version": version, "scheme": TOKEN_VERSION_SCHEME, "decode": decode_settings, "key": key,
            "teachers": {r: {**asdict(cb), "config": roles[r].model_dump(mode="json"), "domains": ROLE_DOMAINS[r]}
                         for r, cb in codebooks.items()},
            "teacher_fingerprints": {r: {"fingerprint": fingerprints[r], "describe": descs[r]} for r in roles}}


def _recorded_codebooks(info: dict[str, Any], out: str) -> dict[str, CodebookInfo]:
    """The codebooks version.json records, without loading them (a run with nothing to do)."""
    names = {f.name for f in fields(CodebookInfo)}
    codebooks = {}
    for role, t in (info.get("teachers") or {}).items():
        try:
            codebooks[role] = CodebookInfo(**{**{k: v for k, v in t.items() if k in names},
                                              "uri": resolve_uri(out, t.get("uri") or ""), "fitted_now": False})
        except TypeError:  # a version.json without the full record (another writer's): nothing to show
            continue
    return codebooks


def run_tokenize(cfg: SpearConfig, *, progress: bool = True, catalog: Catalog | None = None) -> TokenizeSummary:
    """Run the tokenisation job described by ``cfg``; see the module docstring."""
    import sys

    from spear.stages.decode import decode_dataset, is_partial
    from spear.stages.quantize import QuantizerEncoder
    from spear.stages.teacher import TeacherStage

    if not cfg.corpus.sources and catalog is None:
        raise ConfigError("no corpus sources: give --input URI[,URI...] --domain speech|audio, "
                          "or list corpus.sources in the config")
    t0 = time.monotonic()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    options = StorageOptions.from_config(cfg.storage)
    storage = Storage(options)
    out = normalize_uri(cfg.output)  # one spelling for the driver and the Ray workers
    storage.check_access(out)
    if catalog is None:
        catalog = build_catalog(cfg.corpus.sources, storage)
    if catalog.num_objects == 0 and catalog.unreadable:
        from spear.cluster.storage import StorageError

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
    tracker = ObjectTracker()
    commits = 0
    if opened is not None and opened[4].num_rows == 0:
        key, version, store, info, todo, skipped = opened
        log(f"[tokenize] nothing new: all {skipped} objects are committed under {version}")
    else:
        import ray

        # ray_session says "starting Ray ..." at once (with the job's progress setting)
        with ray_session(cfg.ray, dashboard=False, announce=log) as rinfo:  # Ray Data only: no dashboard (see ray_runtime)
            summary.ray_started, summary.ray_start_seconds = True, float(getattr(rinfo, "start_seconds", 0.0))
            ray.data.DataContext.get_current().enable_progress_bars = False
            if missing:
                describe = ray.remote(num_cpus=0.5)(_describe_teacher)
                descs.update(zip(missing, ray.get([describe.remote(roles[r], options) for r in missing])))
                opened = _open_version(out, storage, cfg, decode_settings, roles, descs, catalog.objects)
            key, version, store, info, todo, skipped = opened
            if todo.num_rows == 0:
                log(f"[tokenize] nothing new: all {skipped} objects are committed under {version}")
            else:
                summary.codebooks = _role_codebooks(cfg, roles, descs, todo, catalog.objects, out, version, info,
                                                    storage, options, rinfo, log, summary.warnings)
                new_info = _version_info(version, decode_settings, key, roles, summary.codebooks, descs, fingerprints)
                if info is None or set(info.get("teachers") or {}) != set(new_info["teachers"]) \
                        or info.get("teacher_fingerprints") != new_info["teacher_fingerprints"]:
                    store.write_version_info(new_info, replace=True)
                codebooks = summary.codebooks
                run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
                summary.pending_objects, summary.skipped_objects = todo.num_rows, skipped
                log(f"{summary.pass2_line()}, run {run_id}")
                # only the teachers whose domains have rows in this run
                active = {r: t for r, t in roles.items() if r in codebooks and _role_has_data(todo, r)}
                pools, decode_cfg = stage_resources(cfg, active, log, rinfo.embedded)
                ds = decode_dataset(todo, decode_cfg, options)
                for role, tcfg in active.items():
                    ds = ds.map_batches(TeacherStage, fn_constructor_kwargs={
                        "teacher": tcfg, "column_prefix": role, "storage_options": options,
                        "encode": QuantizerEncoder(codebooks[role].uri, options), "only_domains": ROLE_DOMAINS[role]},
                        **pools[role])
                role_meta = {r: ({"domains": ROLE_DOMAINS[r], "num_codebooks": codebooks[r].num_codebooks,
                                  "frame_rate": codebooks[r].frame_rate, "codebook": codebooks[r].version}
                                 if r in active else None) for r in roles}
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

                partial_notes: dict[str, str] = {}

                def commit(final: bool) -> None:
                    nonlocal committed_files, committed_quarantine, last_commit, commits
                    new_files = tracker.files[committed_files:]
                    done = tracker.take_completed()
                    bad = tracker.quarantined[committed_quarantine:]
                    committed_quarantine = len(tracker.quarantined)
                    # An object kept in part is tokenized (a "quarantined" entry would hide its rows): its note
                    # becomes the reason of its "tokenized" entry.
                    partial_notes.update({q["uri"]: f"{q['stage']}: {q['reason']}" for q in bad if is_partial(q)})
                    bad = [q for q in bad if not is_partial(q)]
                    if not (new_files or done or bad):
                        return
                    ledger_rows = [{"source_uri": o["uri"], "source": o["source"], "domain": o["domain"], "etag": o["etag"],
                                    "size": o["size"], "run_id": run_id, "status": "tokenized", "segments": o["segments"],
                                    "audio_seconds": o["audio_seconds"], "reason": partial_notes.get(o["uri"])} for o in done]
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

    summary.token_version = version
    summary.skipped_objects = skipped
    if legacy:
        summary.warnings.append(
            f"{out} also holds token versions written before a version covered every teacher role "
            f"({', '.join(legacy)}); this run's rows are in {version}. `spear train` reads one version: set "
            f"train.token_version, or tokenise the whole corpus into a new --output to have it in one")
        log(f"[tokenize] warning: {summary.warnings[-1]}")
    ledger = store.ledger()
    live = ledger.filter(pc.equal(ledger["status"], "tokenized")) if ledger.num_rows else ledger
    for f in tracker.files:
        import pyarrow.parquet as pq

        meta = pq.read_metadata(pa.BufferReader(storage.read_bytes(f["file"])))
        for rg in range(meta.num_row_groups):
            g = meta.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                if col.path_in_schema.endswith("_tokens"):
                    role = col.path_in_schema[: -len("_tokens")]
                    summary.token_bytes[role] = summary.token_bytes.get(role, 0) + col.total_compressed_size
    if not summary.codebooks and info:
        summary.codebooks = _recorded_codebooks(info, out)
    summary.quarantined = list(catalog.unreadable) + [q for q in tracker.quarantined if not is_partial(q)]
    summary.partial = [q for q in tracker.quarantined if is_partial(q)]
    summary.new_objects, summary.segments, summary.audio_seconds = tracker.completed_total, tracker.rows, tracker.audio_seconds
    summary.committed_segments = int(pc.sum(live["segments"]).as_py() or 0) if live.num_rows else 0
    summary.committed_objects, summary.commits = live.num_rows, commits
    summary.wall_seconds = time.monotonic() - t0
    log(summary.done_line())
    return summary
