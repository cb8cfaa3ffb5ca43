"""The codebooks of a token version, one set per teacher role: stored, reused or fitted (pass 1).

The tokenize job (:mod:`spear.pipeline.tokenize_job`) asks :func:`role_codebooks` for every
role's codebooks before pass 2. A role whose domain has data for the first time gets them here:
copied from ``mvq.reuse_codebooks``, or fitted on a sample of teacher frames
(:func:`sample_teacher_frames`, which runs decode -> teacher on Ray Data, and
:func:`~spear.stages.quantize.fit_quantizer`). Once a token version has a role's codebooks they
never change; a mismatch is a :class:`~spear.config.ConfigError` that says how to go on.

Example (inside a Ray session, as the tokenize job does)::

    codebooks = role_codebooks(cfg, roles, descs, todo, objects, out, version, info, storage,
                               options, rinfo, log, warnings, plan_stages)
    codebooks["speech"].uri      # where the speech teacher's codebooks live under `out`
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.cluster.console import console_log
from spear.cluster.storage import Storage, StorageError, StorageOptions, join_uri, normalize_uri, resolve_uri
from spear.config import ConfigError, SpearConfig, TeacherConfig
from spear.stages.decode import decode_dataset
from spear.stages.quantize import (SOUND_FRAMES_PER_ENTRY, FrameReservoir, FrameSample, balanced_sample, codebook_uri,
                                   fit_quantizer, fit_quantizer_task, is_heldout, largest_codebook_size,
                                   settle_heldout)

# Modules that load torch (the teacher stage, models.mvq, the artefact readers and schemas.codebooks, which
# uses safetensors.torch) are imported inside the functions that fit or load codebooks: a tokenize run with
# nothing new imports this module and must finish without torch (bench/startup.py).

# Which domains each teacher role reads: the speech teacher every segment, the audio teacher audio-domain ones.
ROLE_DOMAINS: dict[str, Optional[tuple[str, ...]]] = {"speech": None, "audio": ("audio",)}

# (role -> teacher config) -> (role -> teacher pool map_batches kwargs, decode config): the job's resource plan.
StagePlanner = Callable[[dict[str, TeacherConfig]], tuple[dict[str, dict[str, Any]], Any]]


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
    normalize: bool = True                 # fitted on per-dimension normalised embeddings (teachers.ROLE.normalize)


def role_has_data(objects: pa.Table, role: str) -> bool:
    domains = ROLE_DOMAINS[role]
    if objects.num_rows == 0 or domains is None:
        return objects.num_rows > 0
    return bool(pc.any(pc.is_in(objects["domain"], value_set=pa.array(list(domains)))).as_py())


def codebook_shape(cfg: SpearConfig, role: str) -> tuple[int, int]:
    return (cfg.mvq.speech_codebooks if role == "speech" else cfg.mvq.audio_codebooks), cfg.mvq.codebook_size


def codebook_key(cfg: SpearConfig, role: str, tcfg: TeacherConfig, teacher_version: str) -> dict[str, Any]:
    """What a token version holds a role's codebooks to: teacher version, shape and, when the
    embeddings are not normalised, ``normalize: False`` (left out when they are, so the token
    versions of normalised teachers are the ones they always were).

    >>> from spear.config import SpearConfig, TeacherConfig
    >>> codebook_key(SpearConfig(), "audio", TeacherConfig(kind="dasheng", path="d"), "tv")
    {'teacher': 'tv', 'num_codebooks': 8, 'codebook_size': 256, 'normalize': False}
    """
    num_codebooks, size = codebook_shape(cfg, role)
    key: dict[str, Any] = {"teacher": teacher_version, "num_codebooks": num_codebooks, "codebook_size": size}
    if not tcfg.normalize_features:
        key["normalize"] = False
    return key


def _normalisation_words(normalize: bool) -> str:
    return "normalised" if normalize else "raw (not normalised)"


def _ways_on(role: str, frames: int, codebook_size: int, per_entry: int, capped: bool, cfg: SpearConfig) -> list[str]:
    ways = []
    if capped:
        ways.append(f"sample more frames (--set mvq.sample_frames={4 * cfg.mvq.sample_frames}; now {cfg.mvq.sample_frames})")
    ways.append(f"add {'audio-domain ' if ROLE_DOMAINS[role] else ''}data")
    k = largest_codebook_size(frames, per_entry)
    if k and k < codebook_size:
        ways.append(f"choose smaller codebooks (--set mvq.codebook_size={k}: a new token version)")
    return ways


def _too_few_frames(role: str, desc: dict[str, Any], sample, codebook_size: int, cfg: SpearConfig) -> ConfigError:
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


def load_codebooks(role: str, uri: str, desc: dict[str, Any], shape: tuple[int, int], storage: Storage,
                    recorded: Optional[dict[str, Any]], version: str, normalize: bool = True) -> Optional[CodebookInfo]:
    """The codebooks stored at ``uri`` (None when there are none), checked against the teacher, the
    embedding normalisation (``normalize``) and the codebooks ``version.json`` recorded for the role
    (a token version never changes them)."""
    from spear.schemas.codebooks import META_NAME
    from spear.stages.artefacts import load_quantizer

    if not storage.exists(join_uri(uri, META_NAME)):
        if recorded:
            raise ConfigError(f"token version {version} was tokenised with {role} codebooks {recorded['version'][:12]}, "
                              f"which are no longer at {uri}: restore them, or tokenise into a new --output")
        return None
    try:
        q = load_quantizer(uri, storage=storage)
        q.check_compatible(teacher_id=desc["version"], dim=int(desc["dim"]), num_codebooks=shape[0],
                           codebook_size=shape[1])
    except ValueError as exc:
        raise ConfigError(f"{role} codebooks at {uri}: {exc}") from None
    if q.normalize != normalize:
        raise ConfigError(f"{role} codebooks at {uri} were fitted on {_normalisation_words(q.normalize)} embeddings, "
                          f"but teachers.{role}.normalize asks for {_normalisation_words(normalize)} ones: set "
                          f"teachers.{role}.normalize={str(q.normalize).lower()} to use them, or tokenise into a new "
                          f"--output")
    if recorded and recorded["version"] != q.version:
        raise ConfigError(f"{uri} holds {role} codebooks {q.version[:12]}, but token version {version} was tokenised "
                          f"with {recorded['version'][:12]}: restore those, or tokenise into a new --output")
    meta = q.metadata
    loss = meta.get("heldout_relative_loss")
    return CodebookInfo(uri=uri, version=q.version, teacher=desc["name"], teacher_version=desc["version"],
                        num_codebooks=shape[0], frame_rate=float(desc["frame_rate"]), dim=int(desc["dim"]),
                        fitted_now=False, heldout_loss=loss if loss is not None else meta.get("train_relative_loss"),
                        sample_frames=meta.get("training_frames"), heldout_frames=meta.get("heldout_frames"),
                        reused_from=(recorded or {}).get("reused_from"), normalize=q.normalize)


def reuse_codebooks(role: str, source: str, uri: str, desc: dict[str, Any], shape: tuple[int, int],
                     storage: Storage, version: str, normalize: bool = True) -> CodebookInfo:
    """Copy the artefact of ``source`` (a codebook folder, or a folder / token dataset holding several)
    that fits this teacher version, shape and normalisation to ``uri``, so the dataset stays self-contained."""
    from spear.schemas.codebooks import META_NAME, TENSORS_NAME

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
        seen.append(f"{str(meta.get('teacher_id'))[:12]} {meta.get('num_codebooks')}x{meta.get('codebook_size')} "
                    f"{_normalisation_words(bool(meta.get('normalize', True)))}")
        # codebooks fitted with the other normalisation are other codebooks: never reused in their place
        if (meta.get("teacher_id"), meta.get("num_codebooks"), meta.get("codebook_size"), meta.get("dim"),
                bool(meta.get("normalize", True))) != (desc["version"], shape[0], shape[1], int(desc["dim"]), normalize):
            continue
        folder = m[: -len(META_NAME)].rstrip("/")
        for name in (TENSORS_NAME, META_NAME):  # metadata last: its presence marks a complete artefact
            storage.write_bytes(join_uri(uri, name), storage.read_bytes(join_uri(folder, name)))
        cb = load_codebooks(role, uri, desc, shape, storage, None, version, normalize)
        cb.reused_from = folder
        return cb
    raise ConfigError(f"mvq.reuse_codebooks {source} has no {role} codebooks for teacher {desc['name']} "
                      f"{desc['version'][:12]} with {shape[0]}x{shape[1]} {_normalisation_words(normalize)} "
                      f"(it holds: {'; '.join(seen) or 'none'}): codebooks are reusable only for the same teacher "
                      f"version, shape and normalisation (teachers.{role}.normalize)")


def fit_codebooks(cfg: SpearConfig, role: str, tcfg: TeacherConfig, desc: dict[str, Any], objects: pa.Table,
                   uri: str, storage: Storage, options: StorageOptions, rinfo, log,
                   plan_stages: StagePlanner) -> tuple[CodebookInfo, bool]:
    """Pass 1 for one role: (codebooks fitted and saved at ``uri``, whether the sample hit mvq.sample_frames)."""
    num_codebooks, size = codebook_shape(cfg, role)
    log(f"[tokenize] pass 1: fitting {role} codebooks for teacher {desc['name']} ({desc['version'][:12]})")
    pools, decode_cfg = plan_stages({role: tcfg})
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
                      min_frames_per_entry=cfg.mvq.min_frames_per_entry, normalize=tcfg.normalize_features,
                      refine_iters=cfg.mvq.refine_iters, kmeans_points_per_centroid=cfg.mvq.kmeans_points_per_centroid,
                      kmeans_dim_steps=cfg.mvq.kmeans_dim_steps)
    if rinfo.gpus > 0:  # fit where the GPU is
        import ray

        # one thread, as the task reserves one CPU (the fit's default, every CPU of the process, would take the node's);
        # its progress lines reach the driver's console through Ray's worker-log forwarding
        q = ray.get(ray.remote(num_gpus=1, num_cpus=1)(fit_quantizer_task).remote(
            sample, **fit_kwargs, num_threads=1, log=console_log(prefix=f"[tokenize] {role} codebooks: ")))
    else:
        q = fit_quantizer(sample, **fit_kwargs, log=lambda line: log(f"[tokenize] {role} codebooks: {line}"))
    loss = q.metadata.get("heldout_relative_loss")
    if loss is None:
        loss = q.metadata.get("train_relative_loss")
    from spear.stages.artefacts import save_quantizer  # torch: imported when codebooks are fitted

    save_quantizer(q, uri, storage=storage)
    _save_usage_plot(q, sample.heldout if sample.heldout.shape[0] else sample.train, uri, storage)
    cb = CodebookInfo(uri=uri, version=q.version, teacher=desc["name"], teacher_version=desc["version"],
                      num_codebooks=num_codebooks, frame_rate=float(desc["frame_rate"]), dim=int(desc["dim"]),
                      fitted_now=True, heldout_loss=loss, normalize=q.normalize,
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


def role_codebooks(cfg: SpearConfig, roles: dict[str, TeacherConfig], descs: dict[str, dict[str, Any]], todo: pa.Table,
                    objects: pa.Table, out: str, version: str, info: Optional[dict[str, Any]], storage: Storage,
                    options: StorageOptions, rinfo, log, warnings: list[str], plan_stages: StagePlanner) -> dict[str, CodebookInfo]:
    """The codebooks of every role that has them: stored ones, and for a role whose domain has data
    in ``todo`` for the first time, reused (mvq.reuse_codebooks) or fitted (pass 1) now."""
    recorded = (info or {}).get("teachers") or {}
    codebooks: dict[str, CodebookInfo] = {}
    for role, tcfg in roles.items():
        has_data = role_has_data(todo, role)
        if role not in recorded and not has_data:
            continue  # no data for this role yet: no codebooks in the version (training skips its head)
        shape, normalize = codebook_shape(cfg, role), tcfg.normalize_features
        uri = codebook_uri(out, role, descs[role]["version"], *shape, normalize=normalize)
        cb = load_codebooks(role, uri, descs[role], shape, storage, recorded.get(role), version, normalize)
        if cb is None and has_data:
            capped = False
            if cfg.mvq.reuse_codebooks:
                cb = reuse_codebooks(role, cfg.mvq.reuse_codebooks, uri, descs[role], shape, storage, version,
                                     normalize)
                log(f"[tokenize] {role} codebooks {cb.version[:12]} reused from {cb.reused_from}")
            else:
                cb, capped = fit_codebooks(cfg, role, tcfg, descs[role], objects, uri, storage, options, rinfo, log,
                                           plan_stages)
            warning = _few_frames_warning(role, cb, shape[1], capped, cfg)
            if warning:
                warnings.append(warning)
                log(f"[tokenize] warning: {warning}")
        if cb is not None:
            codebooks[role] = cb
    return codebooks


def recorded_codebooks(info: dict[str, Any], out: str) -> dict[str, CodebookInfo]:
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


PROGRESS_EVERY_S = 15.0  # pass 1's progress lines, at most this often within a slice


def next_slice_objects(seen: int, read: int, want_seen: int, first: int) -> int:
    """How many objects pass 1 reads next: what the frames still wanted need at the rate of the
    ``read`` objects so far (``seen`` frames), plus a quarter, and never fewer than ``first``.

    >>> next_slice_objects(seen=3200, read=64, want_seen=42000, first=64)
    970
    >>> next_slice_objects(seen=0, read=64, want_seen=42000, first=64)  # nothing yet: twice as many
    128
    """
    if seen <= 0:
        return max(first, 2 * read)
    return max(first, math.ceil((want_seen - seen) * read / seen * 1.25))


def _pass1_line(kind: str, segments: int, seconds: float, seen: int, t0: float) -> str:
    return f"pass 1 ({kind}): {segments} segments, {seconds / 3600:.3f} h, {seen} frames seen in {time.monotonic() - t0:.0f} s"


def sample_teacher_frames(objects: pa.Table, teacher_cfg: Any, decode_cfg: Any, storage_options: StorageOptions | None,
                          *, sample_frames: int, heldout_fraction: float, seed: int, dim: int, frame_rate: float,
                          domains: Sequence[str] | None = None, pool_kwargs: dict | None = None,
                          progress=None) -> FrameSample:
    """Pass 1: decode a balanced sample, run the teacher, keep uniform reservoirs of frames.

    A small pipeline of its own (decode -> teacher on Ray Data), read slice by slice so that a
    large corpus is only read as far as the reservoirs need.
    """
    # imported here, as in the tokenize job: the teacher stage loads torch, which a run with nothing new never needs
    from spear.stages.teacher import map_teacher_stage, plan_teacher_pool

    ordered = balanced_sample(objects, seed, domains)
    if ordered.num_rows == 0:
        raise ValueError(f"no objects{' of domain ' + '/'.join(domains) if domains else ''} to fit codebooks on")
    # Read objects until about 2x the needed frames went through the reservoir (bounded by the corpus).
    heldout_cap = max(1, int(sample_frames * heldout_fraction))
    train_res = FrameReservoir(sample_frames, dim, seed)
    held_res = FrameReservoir(heldout_cap, dim, seed + 1)
    want_seen = 2 * (sample_frames + heldout_cap)
    plan = pool_kwargs or plan_teacher_pool(teacher_cfg).map_batches_kwargs()
    segments, seconds, sources, seen = 0, 0.0, {}, 0
    prefix = "fit"
    # Feed the objects in slices so that a large corpus is only read as far as needed: a first small
    # slice measures the frames an object gives, the next is sized (with a margin) to fill the
    # reservoirs. Each slice is a dataset of its own and starts its own actor pool, so few large
    # slices beat many small ones; every slice is read whole, which keeps the sample (and so the
    # codebooks) the same from run to run.
    first = max(8, int(decode_cfg.objects_per_task) * 8)
    start, step = 0, first
    t0 = last_report = time.monotonic()
    while start < ordered.num_rows:
        chunk = ordered.slice(start, step)
        start += chunk.num_rows
        ds = decode_dataset(chunk, decode_cfg, storage_options)
        ds = map_teacher_stage(ds, plan, teacher=teacher_cfg, column_prefix=prefix, storage_options=storage_options)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for sid, src, dur, emb, nf in zip(batch["segment_id"], batch["source"], batch["duration"],
                                              batch[f"{prefix}_emb"], batch[f"{prefix}_num_frames"]):
                if not nf:  # quarantined objects and segments shorter than one frame
                    continue
                frames = np.asarray(emb, dtype=np.float32).reshape(int(nf), dim)
                (held_res if is_heldout(str(sid), heldout_fraction) else train_res).add(frames, str(sid))
                segments += 1
                seconds += float(dur)
                sources[str(src)] = sources.get(str(src), 0) + 1
            if progress and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                progress(_pass1_line(teacher_cfg.kind, segments, seconds, train_res.seen + held_res.seen, t0))
        seen = train_res.seen + held_res.seen
        if seen >= want_seen:
            break
        step = next_slice_objects(seen, start, want_seen, first)
    if progress:
        progress(_pass1_line(teacher_cfg.kind, segments, seconds, seen, t0))
    train, heldout = settle_heldout(train_res.sample(), held_res.sample(), heldout_seen=held_res.seen, seen=seen,
                                    fraction=heldout_fraction)
    return FrameSample(train=train, heldout=heldout, segments=segments, audio_seconds=seconds, sources=sources)
