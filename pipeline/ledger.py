"""The ledger of a token dataset: which source objects are tokenised, in which shards, committed how.

One :class:`TokenStore` per token version (``OUTPUT/tokens/<token_version>/``, layout in
:mod:`spear.schemas.shards`, records in :mod:`spear.schemas.ledger`). Workers write shard files; only the driver commits, by writing
the next numbered manifest, which names every live shard and ledger file. The manifest is
one object written whole, so a crash at any moment leaves either the previous commit or the
new one, never a mix; files not named by the latest manifest are leftovers of an
interrupted run and are ignored (``spear status`` lists them, ``clean_uncommitted`` removes them).

A row of a shard is live when its object's latest ledger entry has status ``tokenized`` and
names the row's ``run_id``: partial objects of a killed run and the old rows of a changed
object drop out without rewriting any shard.

Example::

    store = TokenStore("s3://bucket/out", "tv-0123abcd", storage)
    done = store.ledger()                      # latest entry per source object
    table = store.read_table(["segment_id", "speech_tokens"])   # live rows only
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.storage import (Storage, StorageError, find_recorded, join_uri, location_key, normalize_uri,
                                   relative_uri, resolve_uri)
from spear.config import ConfigError
from spear.schemas.ledger import (LEDGER_SCHEMA, MANIFESTS_DIR, SHARDS_DIR, VERSION_INFO_NAME, LedgerEntry, Manifest,
                                  VersionInfo, ledger_keys, ledger_name, manifest_name)
from spear.schemas.segments import CUT_METADATA_COLUMNS
from spear.schemas.shards import decode_tokens, with_cut_metadata
from spear.stages.audio import flac_decode
from spear.stages.writer import parquet_bytes

#: Ledger entries per Parquet row group (entries are small: shards' 256-row groups would make thousands).
LEDGER_ROW_GROUP = 65536


def list_token_versions(output: str, storage: Storage) -> list[str]:
    """Token versions present under ``output`` (those with at least a version.json)."""
    root = join_uri(normalize_uri(output), "tokens")
    if not storage.exists(root):
        return []
    fs, path = storage.filesystem(root)
    versions = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if storage.exists(join_uri(root, name, VERSION_INFO_NAME)):
            versions.append(name)
    return sorted(versions)


def select_token_store(shards: str, storage: Storage, version: Optional[str] = None,
                       option: str = "train.token_version") -> TokenStore:
    """The token version to train on (or export): the one given, or the only one present; ``option`` is the
    setting that chooses one, named in the errors."""
    versions = list_token_versions(shards, storage)
    if not versions:
        raise ConfigError(f"no token dataset at {shards} (run `spear tokenize --output {shards}` first)")
    if version is None:
        if len(versions) > 1:
            raise ConfigError(f"{shards} holds several token versions {versions}: set {option}")
        version = versions[0]
    elif version not in versions:
        raise ConfigError(f"{option} {version} is not at {shards} (present: {versions})")
    store = TokenStore(shards, version, storage)
    if store.latest_manifest() is None:
        raise ConfigError(f"token version {version} at {shards} has no committed shards yet")
    return store


class TokenStore:
    """Manifests, ledger and live rows of one token version."""

    def __init__(self, output: str, version: str, storage: Storage | None = None):
        # one absolute spelling: shard files written by Ray workers (another working directory) land here
        self.output = normalize_uri(output)
        self.version = version
        self.storage = storage or Storage()
        self.root = join_uri(self.output, "tokens", version)
        self._manifest_cache: tuple[int, Manifest] | None = None
        self._resolved_cache: tuple[int, list[str], list[str]] | None = None

    # ----------------------------------------------------------------- paths

    def shard_dir(self, run_id: str) -> str:
        return join_uri(self.root, SHARDS_DIR, run_id)

    def _manifest_uri(self, seq: int) -> str:
        return resolve_uri(self.root, manifest_name(seq))

    # ----------------------------------------------------------------- version info

    def write_version_info(self, info: VersionInfo, *, replace: bool = False) -> None:
        """Write version.json, one object written whole (atomic); an existing one is kept unless ``replace``
        (tokenize rewrites it when a teacher role gets its codebooks; one writer per version, as for commits)."""
        uri = join_uri(self.root, VERSION_INFO_NAME)
        if replace or not self.storage.exists(uri):
            info = json.loads(json.dumps(info))
            for t in (info.get("teachers") or {}).values():  # codebooks inside the output: named relative to it
                rel = relative_uri(self.output, t["uri"]) if isinstance(t, dict) and isinstance(t.get("uri"), str) else None
                if rel is not None:
                    t["uri"] = rel
            self.storage.write_text(uri, json.dumps(info, indent=1, sort_keys=True))

    def version_info(self) -> VersionInfo:
        """version.json, with the codebook URIs (recorded relative to the output) resolved against this root."""
        info = json.loads(self.storage.read_text(join_uri(self.root, VERSION_INFO_NAME)))
        for t in (info.get("teachers") or {}).values():
            if isinstance(t, dict) and isinstance(t.get("uri"), str):
                t["uri"] = resolve_uri(self.output, t["uri"])
        return info

    # ----------------------------------------------------------------- manifests

    def _manifest_seqs(self) -> list[int]:
        uri = join_uri(self.root, MANIFESTS_DIR)
        try:
            entries = self.storage.list_files(uri, extensions=["json"])
        except StorageError:
            return []
        seqs = []
        for e in entries:
            stem = e.uri.rsplit("/", 1)[-1].split(".", 1)[0]
            if stem.isdigit():
                seqs.append(int(stem))
        return sorted(seqs)

    def latest_manifest(self) -> Manifest | None:
        seqs = self._manifest_seqs()
        if not seqs:
            return None
        if self._manifest_cache and self._manifest_cache[0] == seqs[-1]:
            return self._manifest_cache[1]
        uri = self._manifest_uri(seqs[-1])
        m = Manifest.from_json(self.storage.read_text(uri), where=uri)
        self._manifest_cache = (seqs[-1], m)
        return m

    def commit(self, run_id: str, new_shards: Sequence[dict], ledger_rows: Sequence[LedgerEntry],
               info: dict | None = None) -> Manifest:
        """Make ``new_shards`` (``{"file": URI, "rows", "bytes", "run_id"}``) and the ``ledger_rows`` visible in one
        atomic step.

        Writes the ledger delta first, then the next manifest naming everything live. Not safe
        against two drivers committing to the same token version at once (one writer per version).
        """
        prev = self.latest_manifest()
        seq = (prev.seq + 1) if prev else 1
        if self.storage.exists(self._manifest_uri(seq)):
            raise StorageError(f"another run committed manifest {seq} of {self.version} concurrently; re-run to continue")
        # every name relative to the token version root, those carried over from an older manifest too
        prev_shards, prev_ledger = self._resolved(prev) if prev else ([], [])
        ledger_files = [self._record_name(u) for u in prev_ledger]
        if ledger_rows:
            table = pa.Table.from_pylist(list(ledger_rows), schema=LEDGER_SCHEMA)
            name = ledger_name(seq, run_id)
            # one row group per 64k entries (a shard's 256-row groups made a 500k-entry ledger 2000 groups: 2x
            # the bytes, and ~20x the time and 1.6x the memory to read back)
            data = parquet_bytes(table, row_group_size=LEDGER_ROW_GROUP)
            self.storage.write_bytes(resolve_uri(self.root, name), data)
            ledger_files.append(name)
        shards = [dict(s, file=self._record_name(u)) for s, u in zip(prev.shards, prev_shards)] if prev else []
        for s in new_shards:  # workers report full URIs; the record names them relative to the root
            rel = relative_uri(self.root, s["file"])
            if rel is None:
                raise StorageError(f"shard {s['file']} is not inside token version {self.root}")
            shards.append(dict(s, file=rel))
        manifest = Manifest(seq=seq, shards=shards, ledger_files=ledger_files, created_at=time.time(),
                            run_id=run_id, info=info or {})
        self.storage.write_text(self._manifest_uri(seq), manifest.to_json())
        self._manifest_cache = (seq, manifest)
        return manifest

    # ----------------------------------------------------------------- ledger

    def ledger(self) -> pa.Table:
        """The latest ledger entry of every object (later commits win), LEDGER_SCHEMA."""
        m = self.latest_manifest()
        if m is None or not m.ledger_files:
            return LEDGER_SCHEMA.empty_table()
        tables = [pq.read_table(pa.BufferReader(self.storage.read_bytes(uri))) for uri in self._resolved(m)[1]]
        all_rows = pa.concat_tables(tables, promote_options="default")  # version 1 files lack object_key
        if all_rows.num_columns and all_rows.column(0).num_chunks > 64:
            all_rows = all_rows.combine_chunks()  # old ledgers' 256-row groups: thousands of chunks sort slowly
        if "object_key" not in all_rows.column_names:  # only version 1 ledger files
            all_rows = all_rows.append_column("object_key", pa.nulls(all_rows.num_rows, pa.string()))
        # sorted by object key, an object's entries in commit order (Arrow's sort is stable): its last one is the
        # latest (the same object read from another location too). One sorted copy and no hash table of the
        # keys (a ledger may hold millions of cuts).
        keyed = all_rows.append_column("_key", ledger_keys(all_rows))
        rows = keyed.take(pc.sort_indices(keyed, sort_keys=[("_key", "ascending")]))
        keys = rows["_key"]
        if rows.num_rows > 1:
            later = pc.not_equal(keys.slice(1), keys.slice(0, rows.num_rows - 1))     # row i+1 starts a new object
            last = np.r_[later.to_numpy(zero_copy_only=False), True]
            if not last.all():
                rows = rows.filter(pa.array(last))
        return rows.drop_columns(["_key"]).select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)

    # ----------------------------------------------------------------- reading

    def shard_files(self) -> list[str]:
        """URIs of the committed shard files (the manifest's names resolved against this store's root)."""
        m = self.latest_manifest()
        return self._resolved(m)[0] if m else []

    def _record_name(self, uri: str) -> str:
        """``uri`` as a manifest records it: relative to :attr:`root` (absolute only for an old record naming a
        file outside it)."""
        rel = relative_uri(self.root, uri)
        return rel if rel is not None else normalize_uri(uri)

    def _resolved(self, m: Manifest) -> tuple[list[str], list[str]]:
        """(shard URIs, ledger URIs) that manifest ``m`` names."""
        if self._resolved_cache and self._resolved_cache[0] == m.seq:
            return self._resolved_cache[1], self._resolved_cache[2]
        if m.manifest_version >= 2:
            shards = [resolve_uri(self.root, s["file"]) for s in m.shards]
            ledger = [resolve_uri(self.root, f) for f in m.ledger_files]
        else:
            shards = [self._resolve_legacy(m, s["file"]) for s in m.shards]
            ledger = [self._resolve_legacy(m, f) for f in m.ledger_files]
        self._resolved_cache = (m.seq, shards, ledger)
        return shards, ledger

    def _resolve_legacy(self, m: Manifest, name: str) -> str:
        """A name in a version-1 manifest: absolute, or relative to the directory the writer ran in.

        The part after ``tokens/<version>/`` found under this root wins (the folder was moved, copied or
        uploaded, or is read from another directory); else the recorded path if it still exists.
        """
        found = find_recorded(self.storage, self.root, name, f"tokens/{self.version}/")
        if found is not None:
            return found
        raise StorageError(
            f"manifest {m.seq} of token version {self.version} (written by an older spear) names {name}, found "
            f"neither under {self.root} nor at that path: copy the whole tokens/{self.version}/ folder "
            f"(shards/, ledger/, manifests/) under {self.output}, or re-run `spear tokenize` into a new output")

    def read_table(self, columns: Sequence[str] | None = None, *, filters: dict | None = None) -> pa.Table:
        """Live rows of the committed shards (see the module docstring), sorted by segment id."""
        m = self.latest_manifest()
        if m is None:
            raise StorageError(f"token version {self.version} at {self.output} has no committed data")
        ledger = self.ledger()
        ledger = ledger.filter(pc.equal(ledger["status"], "tokenized"))
        cols = None if columns is None else list(dict.fromkeys(list(columns) + ["source_uri", "run_id", "segment_id"]))
        parts = []
        for uri in self._resolved(m)[0]:
            data = self.storage.read_bytes(uri)
            # shards written before Lhotse sources lack the cut metadata columns: read as nulls
            names = set(pq.read_schema(pa.BufferReader(data)).names) if cols is not None else set()
            present = None if cols is None else [c for c in cols if c in names or c not in CUT_METADATA_COLUMNS]
            t = with_cut_metadata(pq.read_table(pa.BufferReader(data), columns=present), cols)
            parts.append(t)
        if not parts:
            return pa.table({})
        table = pa.concat_tables(parts, promote_options="default")
        live_keys = pc.binary_join_element_wise(ledger["source_uri"], ledger["run_id"], "\x00")
        row_keys = pc.binary_join_element_wise(table["source_uri"], table["run_id"], "\x00")
        table = table.filter(pc.is_in(row_keys, value_set=live_keys)).sort_by("segment_id")
        if columns is not None:
            table = table.select(list(columns))
        return table

    def iter_segments(self, roles: Sequence[str] = ("speech", "audio")) -> Iterator[dict[str, Any]]:
        """Per live segment: id, domain, 16 kHz float32 audio and, per teacher role, uint8 tokens [frames, codebooks]
        (None where that teacher has no tokens, e.g. the audio teacher on speech)."""
        table = self.read_table()
        for row in table.to_pylist():
            seg = {"segment_id": row["segment_id"], "domain": row["domain"], "source_uri": row["source_uri"],
                   "offset": row["offset"], "duration": row["duration"], "audio": flac_decode(row["audio"])}
            for role in roles:
                seg[f"{role}_tokens"] = decode_tokens(row.get(f"{role}_tokens"), row.get(f"{role}_num_frames"),
                                                      row.get(f"{role}_num_codebooks"))
                seg[f"{role}_frame_rate"] = row.get(f"{role}_frame_rate")
            yield seg

    # ----------------------------------------------------------------- housekeeping

    def _live_keys(self) -> set[str]:
        """Every spelling-independent key of the shard files the latest committed manifest names: the resolved
        location (real path / bucket key) and the name under ``tokens/<version>/`` as recorded."""
        m = self.latest_manifest()  # lists the manifests again: a commit may have landed since the last read
        if m is None:
            return set()
        keys = {location_key(u) for u in self._resolved(m)[0]}
        marker = f"tokens/{self.version}/"
        for s in m.shards:
            name = str(s["file"]).replace("\\", "/")
            keys.add("name:" + (name.rsplit(marker, 1)[1] if marker in name else name))
        return keys

    def _keys_of_present(self, uri: str) -> set[str]:
        rel = relative_uri(self.root, uri)
        return {location_key(uri)} | ({"name:" + rel} if rel is not None else set())

    def uncommitted_files(self) -> list[str]:
        """Shard files on storage that no committed manifest names (leftovers of interrupted runs)."""
        return [e.uri for e in self._uncommitted_entries()]

    def _uncommitted_entries(self) -> list:
        live = self._live_keys()
        try:
            present = self.storage.list_files(join_uri(self.root, SHARDS_DIR), extensions=["parquet"])
        except StorageError:
            return []
        return sorted((e for e in present if not (self._keys_of_present(e.uri) & live)), key=lambda e: e.uri)

    def clean_uncommitted(self, min_age_s: float = 0.0) -> tuple[list[str], list[str]]:
        """Delete :meth:`uncommitted_files` older than ``min_age_s``; returns (removed, kept as too recent).

        Younger files may belong to a run that is writing now and has not committed yet. Refuses
        (StorageError, nothing deleted) if any file to remove is, by any spelling, a file the committed
        manifest names (read again just before deleting).
        """
        entries = self._uncommitted_entries()
        now = time.time()
        files = [e.uri for e in entries if now - e.mtime >= min_age_s]
        recent = [e.uri for e in entries if now - e.mtime < min_age_s]
        live = self._live_keys()
        overlap = [f for f in files if self._keys_of_present(f) & live]
        if overlap:
            raise StorageError(f"refusing to clean {self.root}: {len(overlap)} of the {len(files)} files to remove "
                               f"(e.g. {overlap[0]}) are named by committed manifest(s); nothing was deleted")
        for f in files:
            self.storage.delete(f)
        return files, recent

