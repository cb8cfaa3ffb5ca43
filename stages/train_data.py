"""Training input: live rows of committed token shards, per rank, resumable to the row.

Each training worker streams the rows assigned to it straight from the shard files. The plan
(:meth:`TrainDataPlan.from_committed`) counts the live rows of each domain in every row group of
every shard file once, on the driver. In every epoch a domain's row groups are put in a seeded
order, which lines its live rows up as positions ``0 .. N-1``; rank r of W reads the r-th of W
contiguous, equal parts of the positions not yet consumed. So every rank gets rows whatever the
number of shard files (one file, one row group: the ranks split its rows), each rank reads only
the row groups its part touches, and the ranks' epochs have the same length (±1 row).

A domain stream (speech or audio) reads only the row groups that hold its domain and keeps only
live rows (the ledger's run per object). The stream's position — epoch, the positions consumed
before the current split and how many rows of its part the rank has consumed — is small,
JSON-serialisable state that goes into every checkpoint; a resumed run continues exactly after
the rows consumed before the checkpoint: at the same world size from each rank's own state, at
another (an elastic resize) from the union of the ranks' consumed positions, split anew over
the new ranks. No row is repeated either way. A dataset that changed since the checkpoint (new
shards committed) restarts the checkpoint's epoch.

Ray Data is what produces the shards (``spear tokenize``); training reads them this way because
Ray Data's streaming split has no fixed order, so it could not resume without repeating rows.

Batches are formed by duration (``batch_seconds`` of padded audio, length-sorted within a
buffer), mixing the speech and audio streams by weight: an item comes from the audio stream
with probability ``w * S_audio / (w * S_audio + S_speech)`` (S = hours committed per domain;
SPEAR boosts audio by w = 3). A domain with fewer live rows than ranks is read by the first
ranks only; the others draw from the other domain.

Example::

    plan = plan_training_data(store)      # spear.pipeline.train_job: a TokenStore's committed rows
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

from spear.cluster.storage import StorageOptions, cached_storage
from spear.models.student.targets import IGNORE_INDEX
from spear.stages.audio import flac_decode



class TrainDataError(RuntimeError):
    """A shard file that is missing or cannot be read as a token shard (one line; retrying cannot help)."""


Unit = tuple[str, int, int]   # (shard file, row group, live rows of the domain in it)


@dataclass(frozen=True)
class TrainDataPlan:
    """What a training run reads: shard files, live (source_uri, run_id) keys, hours per domain, and per
    domain the row groups that hold its live rows with their counts (``units``)."""

    files: tuple[str, ...]
    live_keys: frozenset[str]
    seconds_by_domain: dict[str, float]
    roles: tuple[str, ...]
    codebooks: dict[str, int]          # role -> num_codebooks
    frame_rates: dict[str, float]      # role -> teacher frame rate
    token_version: str = ""
    units: dict[str, tuple[Unit, ...]] = field(default_factory=dict)

    @classmethod
    def from_committed(cls, *, ledger: pa.Table, version_info: dict, files: Sequence[str], token_version: str,
                       storage_options: Optional[StorageOptions], roles: Sequence[str] = ("speech", "audio")
                       ) -> "TrainDataPlan":
        """From what a token version committed: its ledger, its version.json and its live shard files
        (one token version: a run never mixes versions; the training job reads them from its TokenStore).

        Reads the footer and the three key columns of every shard file (not the audio): a missing or
        unreadable file is a :class:`TrainDataError` here, before any worker starts.
        """
        ledger = ledger.filter(pc.equal(ledger["status"], "tokenized"))
        keys = frozenset(f"{u}\x00{r}" for u, r in zip(ledger["source_uri"].to_pylist(), ledger["run_id"].to_pylist()))
        seconds: dict[str, float] = {}
        for d, s in zip(ledger["domain"].to_pylist(), ledger["audio_seconds"].to_pylist()):
            seconds[d] = seconds.get(d, 0.0) + s
        teachers = version_info.get("teachers", {})
        roles = tuple(r for r in roles if r in teachers)
        files = tuple(files)
        return cls(files=files, live_keys=keys, seconds_by_domain=seconds, roles=roles,
                   codebooks={r: int(teachers[r]["num_codebooks"]) for r in roles},
                   frame_rates={r: float(teachers[r]["frame_rate"]) for r in roles}, token_version=token_version,
                   units=count_live_rows(files, keys, storage_options, token_version))

    def live_rows(self, domain: str) -> int:
        return sum(n for _, _, n in self.units.get(domain, ()))


def _open_parquet(storage_options: Optional[StorageOptions], f: str, token_version: str = "") -> pq.ParquetFile:
    """A shard file for ranged reads (footer, then only the row groups and columns asked for)."""
    where = f" of token version {token_version}" if token_version else ""
    try:
        fs, path = cached_storage(storage_options).filesystem(f)
        # no read-ahead cache: s3fs would fetch 50 MB blocks where the footer and three columns are wanted
        return pq.ParquetFile(fs.open(path, "rb", cache_type="none"))
    except FileNotFoundError:
        raise TrainDataError(f"shard file {f}{where} is missing: the committed manifest names it, "
                             "so the dataset was changed or copied incompletely") from None
    except (pa.ArrowInvalid, OSError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainDataError(f"shard file {f}{where} cannot be read as a token shard "
                             f"({type(exc).__name__}: {first})") from None


def count_live_rows(files: Sequence[str], live_keys: frozenset[str], storage_options: Optional[StorageOptions],
                    token_version: str = "") -> dict[str, tuple[Unit, ...]]:
    """domain -> ((file, row group, live rows of that domain), ...) in file order, empty groups left out."""
    value_set = pa.array(list(live_keys), pa.string())
    units: dict[str, list[Unit]] = {}
    for f in files:
        pf = _open_parquet(storage_options, f, token_version)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=["source_uri", "run_id", "domain"])
            keys = pc.binary_join_element_wise(t["source_uri"], t["run_id"], "\x00")
            t = t.filter(pc.is_in(keys, value_set=value_set))
            for d, n in zip(*[c.to_pylist() for c in pc.value_counts(t["domain"]).flatten()]):
                units.setdefault(d, []).append((f, g, int(n)))
    return {d: tuple(u) for d, u in units.items()}


# ----------------------------------------------------------------------------- positions
# A set of positions of one epoch is a sorted list of disjoint half-open [start, end) intervals.


def _union(intervals: Sequence[Sequence[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _complement(consumed: Sequence[Sequence[int]], total: int) -> list[list[int]]:
    out, at = [], 0
    for a, b in _union(consumed):
        if a > at:
            out.append([at, a])
        at = max(at, b)
    if at < total:
        out.append([at, total])
    return out


def _take(intervals: Sequence[Sequence[int]], start: int, stop: int) -> list[list[int]]:
    """The positions with index start..stop-1 within ``intervals`` (counting along them)."""
    out, seen = [], 0
    for a, b in intervals:
        lo, hi = max(a, a + start - seen), min(b, a + stop - seen)
        if lo < hi:
            out.append([lo, hi])
        seen += b - a
    return out


def _count(intervals: Sequence[Sequence[int]]) -> int:
    return sum(b - a for a, b in intervals)


def rank_part(consumed: Sequence[Sequence[int]], total: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s part of an epoch: the r-th of ``world_size`` equal contiguous slices of what is left
    (the first ``n % world_size`` ranks get one row more, so with fewer rows than ranks the first ranks read)."""
    left = _complement(consumed, total)
    n = _count(left)
    size, extra = divmod(n, world_size)
    lo = rank * size + min(rank, extra)
    return _take(left, lo, lo + size + (1 if rank < extra else 0))


@dataclass
class StreamState:
    """Position of one domain stream: JSON-serialisable, merged across ranks at an elastic resize.

    ``base``: positions of ``epoch`` consumed before the current split (the same on every rank);
    ``pos``: rows of this rank's part consumed; ``rank``/``world_size``: the split; ``total`` and
    ``units_crc``: the epoch's size and a fingerprint of the row groups it was computed on.
    """

    epoch: int = 0
    base: list[list[int]] = field(default_factory=list)
    pos: int = 0
    rank: int = 0
    world_size: int = 1
    total: int = 0
    units_crc: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "base": [list(x) for x in self.base], "pos": self.pos, "rank": self.rank,
                "world_size": self.world_size, "total": self.total, "units_crc": self.units_crc}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamState":
        if "base" not in d:  # a checkpoint of the file-per-rank reader: its epoch starts again
            return cls(epoch=int(d.get("epoch", 0)))
        return cls(epoch=int(d["epoch"]), base=_union(d["base"]), pos=int(d["pos"]), rank=int(d["rank"]),
                   world_size=int(d["world_size"]), total=int(d["total"]), units_crc=int(d["units_crc"]))

    def part(self) -> list[list[int]]:
        return rank_part(self.base, self.total, self.rank, self.world_size)

    def consumed(self) -> list[list[int]]:
        return _union(self.base + _take(self.part(), 0, self.pos))


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's: the union of the positions they consumed, to be split anew.

    Ranks read disjoint parts, so the union is exact. Ranks compare at the earliest epoch any of
    them is in: a rank that already wrapped into a later epoch finished its part of that epoch,
    and its rows of the later epoch are read again (at most a buffer's worth: they wrap together).
    """
    if not states:
        return StreamState().to_dict()
    ss = [StreamState.from_dict(s) for s in states]
    epoch = min(s.epoch for s in ss)
    first = next(s for s in ss if s.epoch == epoch)
    consumed: list[list[int]] = list(first.base)
    for s in ss:
        if s.epoch == epoch:
            if (s.total, s.units_crc) == (first.total, first.units_crc):
                consumed += s.consumed()
        else:
            consumed += rank_part(first.base, first.total, s.rank, s.world_size)
    return StreamState(epoch=epoch, base=_union(consumed), total=first.total, units_crc=first.units_crc).to_dict()


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
    """Endless iterator over the live rows of one domain for one rank, from a state.

    Ends only when a fresh epoch gives this rank nothing: the domain has fewer live rows than ranks.
    """

    COLUMNS_BASE = ["segment_id", "source_uri", "run_id", "domain", "duration", "num_samples", "audio"]

    def __init__(self, plan: TrainDataPlan, domain: str, storage_options: Optional[StorageOptions], rank: int,
                 world_size: int, seed: int, state: Optional[dict[str, Any]] = None):
        self.plan = plan
        self.domain = domain
        self.storage_options = storage_options
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.columns = self.COLUMNS_BASE + [c for r in plan.roles for c in (f"{r}_tokens", f"{r}_num_frames")]
        self.units = plan.units.get(domain, ())
        self.total = sum(n for _, _, n in self.units)
        # the files' last two path parts: the fingerprint survives a moved or re-spelled dataset
        self.units_crc = zlib.crc32(repr([("/".join(f.rstrip("/").split("/")[-2:]), g, n)
                                          for f, g, n in self.units]).encode())
        st = StreamState.from_dict(state) if state else StreamState()
        if (st.total, st.units_crc) != (self.total, self.units_crc):
            st = StreamState(epoch=st.epoch)  # other data than at the checkpoint: positions mean nothing
        elif (st.rank, st.world_size) != (rank, world_size):
            st = StreamState(epoch=st.epoch, base=st.consumed())  # a merged state (pos 0) or another split
        st.rank, st.world_size, st.total, st.units_crc = rank, world_size, self.total, self.units_crc
        self.state = st
        self._cache: tuple[Optional[Unit], list[dict[str, Any]]] = (None, [])

    def _epoch_units(self, epoch: int) -> list[tuple[int, Unit]]:
        """(first position, unit) in this epoch's order."""
        # zlib.crc32, not hash(): str hashes are salted per process and the order must be the same everywhere
        order = np.random.default_rng([self.seed, epoch, zlib.crc32(self.domain.encode())]).permutation(len(self.units))
        out, at = [], 0
        for i in order:
            out.append((at, self.units[i]))
            at += self.units[i][2]
        return out

    def _rows(self, unit: Unit) -> list[dict[str, Any]]:
        if self._cache[0] != unit:
            f, g, n = unit
            pf = _open_parquet(self.storage_options, f, self.plan.token_version)
            t = pf.read_row_group(g, columns=[c for c in self.columns if c in pf.schema_arrow.names])
            keys = pc.binary_join_element_wise(t["source_uri"], t["run_id"], "\x00")
            live = pc.is_in(keys, value_set=pa.array(list(self.plan.live_keys), pa.string()))
            rows = t.filter(pc.and_(live, pc.equal(t["domain"], self.domain))).to_pylist()
            if len(rows) != n:
                raise TrainDataError(f"shard file {f} changed since training started: row group {g} holds "
                                     f"{len(rows)} live {self.domain} rows, the plan counted {n}")
            self._cache = (unit, rows)
        return self._cache[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            part = self.state.part()
            if not part and not self.state.base:
                return  # a whole epoch has nothing for this rank: fewer live rows than ranks
            units = self._epoch_units(self.state.epoch)
            for a, b in _take(part, self.state.pos, _count(part)):
                for start, unit in units:
                    lo, hi = max(a, start), min(b, start + unit[2])
                    if lo >= hi:
                        continue
                    rows = self._rows(unit)
                    for i in range(lo, hi):
                        self.state.pos += 1
                        yield rows[i - start]
            self.state = StreamState(epoch=self.state.epoch + 1, rank=self.rank, world_size=self.world_size,
                                     total=self.total, units_crc=self.units_crc)


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
