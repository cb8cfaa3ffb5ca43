"""Training input: live rows of committed token shards, per rank, resumable to the row.

Each training worker streams the rows assigned to it straight from the shard files: in every
epoch the files are put in a seeded order and rank r of W reads files r, r+W, ...; a domain
stream (speech or audio) reads only the row groups whose ``domain`` statistics can hold its
domain, and keeps only live rows (the ledger's run per object). The stream's position —
epoch, files finished and rows consumed in the files under way — is small, JSON-serialisable
state that goes into every checkpoint; a resumed run (at any world size) continues exactly
after the rows consumed before the checkpoint, so no data is repeated.

Ray Data is what produces the shards (``spear tokenize``); training reads them this way because
Ray Data's streaming split has no fixed order, so it could not resume without repeating rows.

Batches are formed by duration (``batch_seconds`` of padded audio, length-sorted within a
buffer), mixing the speech and audio streams by weight: an item comes from the audio stream
with probability ``w * S_audio / (w * S_audio + S_speech)`` (S = hours committed per domain;
SPEAR boosts audio by w = 3).

Example::

    plan = TrainDataPlan.from_store(store, roles=("speech", "audio"))
    loader = TrainBatches(plan, storage_options, rank=0, world_size=1, batch_seconds=60, audio_weight=3, seed=0)
    for batch in loader:                  # dict of numpy arrays, see collate()
        ...
    state = loader.state()                # into the checkpoint; TrainBatches(..., state=state) resumes
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.storage import StorageOptions
from spear.stages.audio import flac_decode
from spear.stages.decode import _storage

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainDataPlan:
    """What a training run reads: shard files with row counts, live (source_uri, run_id) keys, hours per domain."""

    files: tuple[str, ...]
    live_keys: frozenset[str]
    seconds_by_domain: dict[str, float]
    roles: tuple[str, ...]
    codebooks: dict[str, int]          # role -> num_codebooks
    frame_rates: dict[str, float]      # role -> teacher frame rate
    token_version: str = ""

    @classmethod
    def from_store(cls, store, roles: Sequence[str] = ("speech", "audio")) -> "TrainDataPlan":
        """From a :class:`~spear.pipeline.ledger.TokenStore` (one token version: a run never mixes versions)."""
        ledger = store.ledger()
        ledger = ledger.filter(pc.equal(ledger["status"], "tokenized"))
        keys = frozenset(f"{u}\x00{r}" for u, r in zip(ledger["source_uri"].to_pylist(), ledger["run_id"].to_pylist()))
        seconds: dict[str, float] = {}
        for d, s in zip(ledger["domain"].to_pylist(), ledger["audio_seconds"].to_pylist()):
            seconds[d] = seconds.get(d, 0.0) + s
        info = store.version_info()
        teachers = info.get("teachers", {})
        roles = tuple(r for r in roles if r in teachers)
        return cls(files=tuple(store.shard_files()), live_keys=keys, seconds_by_domain=seconds, roles=roles,
                   codebooks={r: int(teachers[r]["num_codebooks"]) for r in roles},
                   frame_rates={r: float(teachers[r]["frame_rate"]) for r in roles}, token_version=store.version)


@dataclass
class StreamState:
    """Position of one domain stream: JSON-serialisable, merged across ranks at checkpoints."""

    epoch: int = 0
    done_files: list[str] = field(default_factory=list)
    partial: dict[str, int] = field(default_factory=dict)   # file -> rows (of this domain) consumed

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done_files": list(self.done_files), "partial": dict(self.partial)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamState":
        return cls(epoch=int(d["epoch"]), done_files=list(d["done_files"]), partial={k: int(v) for k, v in d["partial"].items()})


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's: files any rank finished are done; partial offsets are per file.

    Ranks read disjoint files, so the union is exact. A rank that already wrapped into a later
    epoch is rewound to the earliest epoch (its rows of the new epoch are read again: documented).
    """
    if not states:
        return StreamState().to_dict()
    epoch = min(int(s["epoch"]) for s in states)
    done: set[str] = set()
    partial: dict[str, int] = {}
    for s in states:
        if int(s["epoch"]) != epoch:
            continue
        done.update(s["done_files"])
        for f, n in s["partial"].items():
            partial[f] = max(partial.get(f, 0), int(n))
    return StreamState(epoch=epoch, done_files=sorted(done), partial={f: n for f, n in partial.items() if f not in done}).to_dict()


def resume_state(rank_states: Sequence[dict[str, Any]], rank: int, world_size: int) -> Optional[dict[str, Any]]:
    """The loader state for ``rank`` of ``world_size`` from the per-rank states saved in a checkpoint.

    Same world size: the rank's own state (exact). New world size (an elastic resize): the ranks'
    stream positions merged, from the start of each rank's current buffer, so at most one buffer
    per old rank is read again.
    """
    if not rank_states:
        return None
    if len(rank_states) == world_size:
        return rank_states[rank]
    domains = sorted({d for s in rank_states for d in s.get("streams", {})})
    return {"streams": {d: merge_states([s["streams"][d] for s in rank_states if d in s.get("streams", {})])
                        for d in domains}}


class DomainStream:
    """Endless iterator over the live rows of one domain for one rank, from a state."""

    COLUMNS_BASE = ["segment_id", "source_uri", "run_id", "domain", "duration", "num_samples", "audio"]

    def __init__(self, plan: TrainDataPlan, domain: str, storage_options: Optional[StorageOptions], rank: int,
                 world_size: int, seed: int, state: Optional[dict[str, Any]] = None):
        self.plan = plan
        self.domain = domain
        self.storage_options = storage_options
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.state = StreamState.from_dict(state) if state else StreamState()
        self.columns = self.COLUMNS_BASE + [c for r in plan.roles for c in (f"{r}_tokens", f"{r}_num_frames")]
        self._meta_cache: dict[str, pq.FileMetaData] = {}

    def _my_files(self) -> list[str]:
        # zlib.crc32, not hash(): str hashes are salted per process and the order must be the same everywhere
        order = np.random.default_rng([self.seed, self.state.epoch, zlib.crc32(self.domain.encode())]).permutation(
            len(self.plan.files))
        remaining = [self.plan.files[i] for i in order if self.plan.files[i] not in set(self.state.done_files)]
        return remaining[self.rank::self.world_size]

    def _row_groups(self, f: str, meta: pq.FileMetaData) -> list[int]:
        idx = meta.schema.to_arrow_schema().get_field_index("domain")
        groups = []
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(idx).statistics
            if st is None or not st.has_min_max or (st.min <= self.domain <= st.max):
                groups.append(g)
        return groups

    def _read_file(self, f: str) -> pa.Table:
        pf = pq.ParquetFile(pa.BufferReader(_storage(self.storage_options).read_bytes(f)))
        groups = self._row_groups(f, pf.metadata)
        if not groups:
            return pa.table({c: [] for c in self.columns})
        t = pf.read_row_groups(groups, columns=[c for c in self.columns if c in pf.schema_arrow.names])
        keys = pc.binary_join_element_wise(t["source_uri"], t["run_id"], "\x00")
        live = pc.is_in(keys, value_set=pa.array(list(self.plan.live_keys), pa.string()))
        return t.filter(pc.and_(live, pc.equal(t["domain"], self.domain)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty_epochs = 0
        while True:
            files = self._my_files()
            produced = False
            for f in files:
                table = self._read_file(f)
                start = self.state.partial.get(f, 0)
                for row in table.slice(start).to_pylist():
                    self.state.partial[f] = self.state.partial.get(f, 0) + 1
                    produced = True
                    yield row
                self.state.partial.pop(f, None)
                self.state.done_files.append(f)
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                return  # this rank has nothing of this domain
            self.state = StreamState(epoch=self.state.epoch + 1)


def collate(rows: list[dict[str, Any]], roles: Sequence[str], codebooks: dict[str, int]) -> dict[str, np.ndarray]:
    """Rows -> padded arrays: wavs [B, S] float32, wav_lens [B], domains [B] (1 = audio), and per role
    ``<role>_tokens`` [B, T, C] int64 (IGNORE_INDEX where absent or padded), ``<role>_lens`` [B]."""
    wavs = [flac_decode(r["audio"]) for r in rows]
    B, S = len(rows), max(len(w) for w in wavs)
    out: dict[str, np.ndarray] = {"wavs": np.zeros((B, S), np.float32),
                                  "wav_lens": np.array([len(w) for w in wavs], np.int64),
                                  "domains": np.array([1 if r["domain"] == "audio" else 0 for r in rows], np.int64),
                                  "segment_ids": np.array([r["segment_id"] for r in rows], dtype=object)}
    for i, w in enumerate(wavs):
        out["wavs"][i, : len(w)] = w
    for role in roles:
        C = codebooks[role]
        lens = np.array([int(r.get(f"{role}_num_frames") or 0) if r.get(f"{role}_tokens") is not None else 0 for r in rows],
                        np.int64)
        T = max(1, int(lens.max()) if B else 1)
        tok = np.full((B, T, C), IGNORE_INDEX, np.int64)
        for i, r in enumerate(rows):
            data = r.get(f"{role}_tokens")
            if data is not None and lens[i]:
                tok[i, : lens[i]] = np.frombuffer(data, np.uint8).reshape(lens[i], C)
        out[f"{role}_tokens"] = tok
        out[f"{role}_lens"] = lens
    return out


class TrainBatches:
    """Duration-batched, weight-mixed batches for one rank; ``state()`` resumes it exactly.

    Batches are cut from a buffer of a few batches' worth of rows. The state is the streams'
    position and the RNG at the start of the current buffer plus how many of its batches were
    handed out: refilling from there rebuilds the same buffer, and the batches already used are
    skipped, so a resumed run sees exactly the batches a run without interruption would have.
    """

    def __init__(self, plan: TrainDataPlan, storage_options: Optional[StorageOptions], *, rank: int, world_size: int,
                 batch_seconds: float, audio_weight: float, seed: int, state: Optional[dict[str, Any]] = None,
                 buffer_batches: int = 4, max_items: int = 256):
        self.plan = plan
        self.batch_seconds = batch_seconds
        self.buffer_batches = buffer_batches
        self.max_items = max_items
        state = copy.deepcopy(state) if state else {}
        self.streams = {d: DomainStream(plan, d, storage_options, rank, world_size, seed, state.get("streams", {}).get(d))
                        for d in ("speech", "audio") if plan.seconds_by_domain.get(d, 0) > 0}
        s_sp, s_au = plan.seconds_by_domain.get("speech", 0.0), plan.seconds_by_domain.get("audio", 0.0)
        self.p_audio = (audio_weight * s_au / (audio_weight * s_au + s_sp)) if (s_au + s_sp) > 0 else 0.0
        self.rng = np.random.default_rng([seed, rank])
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self._skip = int(state.get("skip", 0))
        self._iters = {d: iter(s) for d, s in self.streams.items()}
        self._buffer_start = self._snapshot()
        self._yielded = self._skip

    def _snapshot(self) -> tuple[dict[str, dict], dict]:
        return {d: s.state.to_dict() for d, s in self.streams.items()}, copy.deepcopy(self.rng.bit_generator.state)

    def state(self) -> dict[str, Any]:
        """Position after the last batch handed out (JSON-serialisable; merge ranks' with :func:`merge_states`)."""
        streams, rng = self._buffer_start
        return {"streams": copy.deepcopy(streams), "rng": rng, "skip": self._yielded}

    def _draw(self) -> Optional[dict[str, Any]]:
        domain = "audio" if ("audio" in self._iters and ("speech" not in self._iters or self.rng.random() < self.p_audio)) \
            else "speech"
        try:
            return next(self._iters[domain])
        except StopIteration:
            del self._iters[domain]
            return self._draw() if self._iters else None

    def _fill(self) -> list[list[dict[str, Any]]]:
        """Read a buffer of rows, sort by length, cut into batches of padded duration <= batch_seconds, shuffle."""
        buffer: list[dict[str, Any]] = []
        seconds = 0.0
        while seconds < self.buffer_batches * self.batch_seconds:
            row = self._draw()
            if row is None:
                break
            buffer.append(row)
            seconds += row["duration"]
        buffer.sort(key=lambda r: (r["duration"], r["segment_id"]))
        batches, cur = [], []
        for row in buffer:
            if cur and ((len(cur) + 1) * row["duration"] > self.batch_seconds or len(cur) >= self.max_items):
                batches.append(cur)
                cur = []
            cur.append(row)
        if cur:
            batches.append(cur)
        return [batches[i] for i in self.rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            self._buffer_start = self._snapshot()
            batches = self._fill()
            if not batches:
                return
            skip, self._skip = self._skip, 0
            self._yielded = skip
            for rows in batches[skip:]:
                self._yielded += 1
                yield collate(rows, self.plan.roles, self.plan.codebooks)
