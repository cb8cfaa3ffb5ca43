"""`spear status OUTPUT`: what a spear output holds, from its commit records.

A token dataset (``tokens/<version>/``), per token version: teachers and codebooks, committed
sources with objects, segments and hours per domain, quarantined objects with reasons, and
uncommitted leftovers (shard files of interrupted runs) with the command that removes them.
A decode output (``decode.json``): its summary. A training output (``train/checkpoint_*``): the
latest checkpoint. An exported student (``config.json`` + ``model.safetensors``) and a `spear run`
output (its ``tokens/``, ``student/``, ... parts) are named as such. Anything else, or a path that
does not exist, is an error (:class:`StorageError`, one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import json

from spear.cluster.storage import Storage, StorageError, join_uri, normalize_uri
from spear.pipeline.ledger import TokenStore, list_token_versions


@dataclass
class VersionStatus:
    token_version: str
    teachers: dict[str, Any]
    commits: int
    shards: int
    sources: dict[str, dict[str, Any]]          # source -> {domain, objects, segments, hours}
    hours_by_domain: dict[str, float]
    segments: int
    quarantined: list[dict[str, str]]
    uncommitted: list[str] = field(default_factory=list)


@dataclass
class OutputStatus:
    output: str
    versions: list[VersionStatus]
    kind: str = "tokens"                     # "tokens" | "decode" | "train" | "export" | "run"
    decode: Optional[dict[str, Any]] = None  # decode.json's summary (objects, segments, hours, quarantined, files)
    train: Optional[dict[str, Any]] = None   # latest checkpoint: step, token_version, checkpoints, world_sizes
    export: Optional[dict[str, Any]] = None  # an exported student's config.json (without the weights)
    parts: dict[str, "OutputStatus"] = field(default_factory=dict)   # a `spear run` output's outputs

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def human(self) -> str:
        if self.kind == "decode":
            d = self.decode or {}
            return (f"decode output {self.output}: {d.get('objects', 0)} objects ({d.get('decoded_objects', 0)} decoded, "
                    f"{d.get('quarantined', 0)} quarantined), {d.get('segments', 0)} segments, "
                    f"{d.get('audio_hours', 0.0):.3f} h in {d.get('files', 0)} part files")
        if self.kind == "train":
            t = self.train or {}
            skipped = t.get("incomplete_checkpoints") or []
            return (f"training output {self.output}: latest checkpoint step {t.get('step')} of {t.get('checkpoints')} "
                    f"kept, token version {t.get('token_version')}, world sizes {t.get('world_sizes')}"
                    + "".join(f"\n  incomplete (skipped): {c['uri']}: {c['reason']}" for c in skipped))
        if self.kind == "export":
            e = self.export or {}
            return (f"exported student {self.output}: {e.get('architecture', '?')}, step {e.get('step', '?')}, "
                    f"token version {e.get('token_version', '?')}")
        if self.kind == "run":
            return "\n".join([f"spear run output {self.output}:"]
                             + [f"[{name}] " + part.human() for name, part in self.parts.items()])
        lines = []
        for v in self.versions:
            lines.append(f"token version {v.token_version}: {v.commits} commits, {v.shards} shards, {v.segments} segments, "
                         + ", ".join(f"{h:.3f} h {d}" for d, h in sorted(v.hours_by_domain.items())))
            for role, t in sorted(v.teachers.items()):
                lines.append(f"  {role} teacher: {t.get('teacher')} ({t.get('teacher_version', '')[:12]}), "
                             f"codebooks {t.get('version', '')[:12]} x{t.get('num_codebooks')}")
            for name, s in sorted(v.sources.items()):
                lines.append(f"  source {name} [{s['domain']}]: {s['objects']} objects, {s['segments']} segments, "
                             f"{s['hours']:.3f} h")
            if v.quarantined:
                lines.append(f"  quarantined {len(v.quarantined)}:")
                lines += [f"    {q['uri']}: {q['reason']}" for q in v.quarantined]
            if v.uncommitted:
                lines.append(f"  {len(v.uncommitted)} uncommitted shard files from interrupted runs; remove with: "
                             f"spear status {self.output} --clean")
        return "\n".join(lines)


def _existing_root(output: str, storage: Storage) -> str:
    root = normalize_uri(output)
    if not storage.exists(root):
        raise StorageError(f"{output} does not exist")
    return root


def output_status(output: str, storage: Storage | None = None) -> OutputStatus:
    """What ``output`` holds; StorageError (one line) if it does not exist or is no spear output."""
    storage = storage or Storage()
    root = _existing_root(output, storage)
    found = _other_kind(output, root, storage)
    if found is not None:
        return found
    versions = []
    for version in list_token_versions(output, storage):
        store = TokenStore(output, version, storage)
        manifest = store.latest_manifest()
        info = store.version_info()
        ledger = store.ledger()
        sources: dict[str, dict[str, Any]] = {}
        hours: dict[str, float] = {}
        quarantined = []
        segments = 0
        for row in ledger.to_pylist():
            if row["status"] == "quarantined":
                quarantined.append({"uri": row["source_uri"], "reason": row["reason"] or ""})
                continue
            s = sources.setdefault(row["source"], {"domain": row["domain"], "objects": 0, "segments": 0, "hours": 0.0})
            s["objects"] += 1
            s["segments"] += row["segments"]
            s["hours"] += row["audio_seconds"] / 3600
            hours[row["domain"]] = hours.get(row["domain"], 0.0) + row["audio_seconds"] / 3600
            segments += row["segments"]
        versions.append(VersionStatus(
            token_version=version, teachers=info.get("teachers", {}), commits=manifest.seq if manifest else 0,
            shards=len(manifest.shards) if manifest else 0, sources=sources, hours_by_domain=hours, segments=segments,
            quarantined=quarantined, uncommitted=store.uncommitted_files()))
    if not versions:
        raise StorageError(f"{output} is not a spear output (no decode.json, tokens/<version>/, train/ checkpoints "
                           "or exported student in it)")
    return OutputStatus(output=output, versions=versions)


def _other_kind(output: str, root: str, storage: Storage) -> Optional[OutputStatus]:
    """The status of a decode, training, export or `spear run` output at ``root``; None for a token dataset
    (or nothing)."""
    # Each kind of output's reader is imported when the output is of that kind: `spear status` of a
    # token dataset (the common case) then loads neither torch nor Ray Train (the training job does).
    if storage.exists(join_uri(root, "decode.json")):
        from spear.pipeline.decode_job import read_decode_record

        record = read_decode_record(root, storage)
        s = record.summary
        q = s.get("quarantined", [])
        return OutputStatus(output=output, versions=[], kind="decode", decode={
            "objects": s.get("objects", 0), "decoded_objects": s.get("decoded_objects", 0),
            "segments": s.get("segments", 0), "audio_seconds": s.get("audio_seconds", 0.0),
            "audio_hours": s.get("audio_seconds", 0.0) / 3600, "quarantined": len(q) if isinstance(q, list) else int(q),
            "files": len(record.files)})
    if storage.exists(join_uri(root, "train")):
        from spear.pipeline.train_job import list_checkpoints

        listing = list_checkpoints(root, storage)
        found = listing.complete
        if found:
            from spear.stages.train_loop import STATE_FILE

            step, uri = found[-1]
            state = json.loads(storage.read_text(join_uri(uri, STATE_FILE)))
            return OutputStatus(output=output, versions=[], kind="train", train={
                "step": step, "checkpoints": len(found), "checkpoint": uri,
                "token_version": state.get("token_version", ""), "world_sizes": state.get("world_sizes", []),
                "incomplete_checkpoints": [{"uri": u, "reason": why} for u, why in listing.incomplete]})
    if storage.exists(join_uri(root, "config.json")) and storage.exists(join_uri(root, "model.safetensors")):
        config = json.loads(storage.read_text(join_uri(root, "config.json")))
        if config.get("format") == "spear-student":
            meta = config.get("metadata", {})
            return OutputStatus(output=output, versions=[], kind="export", export={
                "architecture": config.get("encoder", {}).get("architecture"), "frame_rate": config.get("frame_rate"),
                "layers": len(config.get("layer_dims", [])), "step": meta.get("step"),
                "token_version": meta.get("token_version")})
    if not list_token_versions(root, storage):
        parts = {}
        for name in ("tokens", "student", "export", "decoded"):  # `spear run` (and demo) layouts
            sub = join_uri(root, name)
            if storage.exists(sub):
                try:
                    parts[name] = output_status(sub, storage)
                except StorageError:
                    continue
        if parts:
            return OutputStatus(output=output, versions=[], kind="run", parts=parts)
    return None


def clean_uncommitted(output: str, storage: Storage | None = None,
                      min_age_s: float = 0.0) -> tuple[list[str], list[str]]:
    """Remove shard files that no committed manifest names and are older than ``min_age_s``, in every token
    version; never one a committed manifest names, by any spelling (:meth:`TokenStore.clean_uncommitted`
    refuses then). Returns (removed, kept because younger than ``min_age_s``: a running job may own them)."""
    storage = storage or Storage()
    _existing_root(output, storage)
    if not list_token_versions(output, storage):
        output_status(output, storage)  # no spear output: the one-line error before anything is said
    removed, recent = [], []
    for version in list_token_versions(output, storage):
        r, k = TokenStore(output, version, storage).clean_uncommitted(min_age_s)
        removed += r
        recent += k
    return removed, recent
