"""`spear status OUTPUT`: what a token output holds, from its committed manifests and ledger.

Per token version: teachers and codebooks, committed sources with objects, segments and
hours per domain, quarantined objects with reasons, and uncommitted leftovers (shard files
of interrupted runs) with the command that removes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spear.cluster.storage import Storage
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

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def human(self) -> str:
        if not self.versions:
            return f"{self.output}: no token versions yet (run `spear tokenize`)"
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


def output_status(output: str, storage: Storage | None = None) -> OutputStatus:
    storage = storage or Storage()
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
    return OutputStatus(output=output, versions=versions)


def clean_uncommitted(output: str, storage: Storage | None = None) -> list[str]:
    """Remove shard files that no committed manifest names, in every token version."""
    storage = storage or Storage()
    removed = []
    for version in list_token_versions(output, storage):
        removed += TokenStore(output, version, storage).clean_uncommitted()
    return removed
