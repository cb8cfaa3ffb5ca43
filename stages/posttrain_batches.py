"""Post-training input: batches of labelled utterances and synthetic counting clips, per rank, resumable.

The prepared training table (:mod:`spear.schemas.posttrain_data`: FLAC audio plus ``speaker``,
``text``, ``pivot``, ``sentence`` per utterance) becomes a :class:`PostTrainPlan` on the driver
(:func:`plan_posttrain`): per attribute the rows that carry its label, the speakers' class indexes
(the sorted training speakers), and the semantic targets (one vector per distinct target text, from
the ``targets`` function the job passes: :func:`~spear.stages.text_targets.build_text_targets`) with sentence groups (translations of one sentence share a group,
so they are not each other's negatives).

Every row of a batch is drawn for one attribute by the attributes' ``sample_weight``: a speaker
row comes from the rows with a speaker, a semantic row from the rows with a target, a counting row
is generated on the fly (the plan's ``counting_generator``: the job passes
:class:`~spear.synthetic.counting.CountingGenerator`, which sits in a layer above this one; seeded
by (seed, step, rank), so a resumed step gets the same clips). A labelled row carries every label it
has (a row drawn for speaker that also has a target trains the semantic head too). Utterances
longer than ``max_seconds`` are cropped at a random offset.

Each labelled attribute is a stream over its rows in a seeded permutation per epoch, split among
the ranks as pre-training splits its rows (:mod:`spear.stages.train_data`: rank r of W reads the
r-th of W equal parts of the positions not yet consumed). The state (per attribute: epoch, positions
consumed, position in the rank's part; the batch RNG) goes into every checkpoint; a run resumed at
the same world size continues exactly, one resumed at another (an elastic resize) merges the
ranks' consumed positions (:func:`~spear.stages.train_data.resume_state`) and splits the rest anew.

Example::

    plan = plan_posttrain(train_table, cfg.posttrain.attributes, clip_seconds=2.0, targets=text_vectors,
                          counting_generator=CountingGenerator)
    specs = plan.specs()                                  # AttributeSpecs for PostTrainModel
    loader = PostTrainBatches(train_table, plan, rank=0, world_size=1, batch_size=16, max_seconds=6.0, seed=0)
    batch, ids = loader.next_batch()                      # a models.posttrain.PostTrainBatch
    state = loader.state()                                # into the checkpoint
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from spear.config import AttributeConfig, ConfigError
from spear.models.posttrain import AttributeSpec, PostTrainBatch
from spear.stages.audio import flac_decode
from spear.stages.text_targets import target_texts
from spear.stages.train_data import StreamState

SAMPLE_RATE = 16000
#: Columns of the prepared table that training reads.
COLUMNS = ("utt_id", "audio", "num_samples", "speaker", "text", "pivot", "sentence")


class PostTrainDataError(RuntimeError):
    """The training rows cannot give a batch (one line; a retry cannot help)."""


@dataclass(frozen=True)
class SemanticTargets:
    """A semantic attribute's targets: ``vectors`` [K, D] (one per distinct target text), ``index`` [N]
    (each training row's target, -1: none), ``groups`` [N] (sentence group ids, -1: none), ``texts``."""

    vectors: np.ndarray
    index: np.ndarray
    groups: np.ndarray
    texts: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class PostTrainPlan:
    """What every worker needs besides the table: the attributes, the training rows' ids, the
    speakers (sorted; class i is ``speakers[i]``), each row's speaker class (-1: none), the semantic
    targets per attribute and the counting tasks' classes per attribute."""

    attributes: tuple[AttributeConfig, ...]
    utt_ids: tuple[str, ...]
    speakers: tuple[str, ...] = ()
    speaker_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    semantic: dict[str, SemanticTargets] = field(default_factory=dict)
    counting: dict[str, dict[str, int]] = field(default_factory=dict)
    clip_seconds: float = 2.0
    #: ``(tasks=, seed=, worker=, duration=) ->`` an endless iterator of items (``wav``, ``task``, ``label``)
    #: with ``num_classes`` and ``task_index(task)``: :class:`~spear.synthetic.counting.CountingGenerator`
    counting_generator: Optional[Callable[..., Any]] = None

    def eligible(self, name: str) -> np.ndarray:
        """Row indexes (table order) that carry attribute ``name``'s label."""
        kind = self.attribute(name).kind
        if kind == "speaker":
            return np.flatnonzero(self.speaker_index >= 0)
        if kind == "semantic":
            return np.flatnonzero(self.semantic[name].index >= 0)
        return np.zeros(0, np.int64)

    def attribute(self, name: str) -> AttributeConfig:
        return next(a for a in self.attributes if a.name == name)

    def specs(self) -> list[AttributeSpec]:
        """The :class:`AttributeSpec` of every attribute (speaker classes, target sizes, counting tasks)."""
        out = []
        for a in self.attributes:
            common = dict(name=a.name, kind=a.kind, weight=a.loss_weight, pool_hidden=a.pool_hidden,
                          time_context=a.time_context)
            if a.kind == "speaker":
                out.append(AttributeSpec(dim=a.dim, num_classes=len(self.speakers), margin=a.margin, scale=a.scale,
                                         **common))
            elif a.kind == "semantic":
                out.append(AttributeSpec(dim=self.semantic[a.name].dim, align=a.align,
                                         contrastive_weight=a.contrastive_weight, temperature=a.temperature, **common))
            else:
                out.append(AttributeSpec(dim=a.dim, tasks=self.counting[a.name], counting_loss=a.counting_loss,
                                         **common))
        return out

    def info(self) -> dict[str, Any]:
        """JSON-ready: what the heads were trained on (an export's metadata)."""
        return {"speakers": list(self.speakers),
                "attributes": {a.name: {"kind": a.kind, "rows": int(len(self.eligible(a.name))),
                                        **({"target_field": a.target_field, "target_dim": self.semantic[a.name].dim,
                                            "targets": "text_encoder" if a.text_encoder else "pivot_text_embedding",
                                            "text_encoder": a.text_encoder,
                                            "distinct_targets": len(self.semantic[a.name].texts)}
                                           if a.kind == "semantic" else {}),
                                        **({"tasks": self.counting[a.name], "clip_seconds": self.clip_seconds}
                                           if a.kind == "counting" else {})}
                               for a in self.attributes}}


def _strings(table: pa.Table, column: str) -> list[Optional[str]]:
    if column not in table.column_names:
        return [None] * table.num_rows
    return [v if v is None or str(v).strip() else None for v in table.column(column).to_pylist()]


def plan_posttrain(table: pa.Table, attributes: Sequence[AttributeConfig], clip_seconds: float = 2.0,
                                  targets: Optional[Callable[[Sequence[str], AttributeConfig], np.ndarray]] = None,
                   counting_generator: Optional[Callable[..., Any]] = None) -> PostTrainPlan:
    """The :class:`PostTrainPlan` of the training rows ``table`` for ``attributes``.

    ``targets(distinct sorted texts, attribute) -> [N, dim]``: the semantic attributes' target vectors
    (the job: :func:`~spear.stages.text_targets.build_text_targets`, cached); ``counting_generator``:
    what makes counting clips. Each is needed only by attributes of its kind. Raises :class:`~spear.config.ConfigError` naming the attribute when no row can train it.

    >>> import pyarrow as pa
    >>> from spear.config import AttributeConfig
    >>> from spear.models.posttrain import pivot_text_embedding
    >>> t = pa.table({"utt_id": ["a", "b", "c"], "speaker": ["s2", "s1", None], "text": ["hi", None, "yo"],
    ...               "pivot": [None, None, None]})
    >>> plan = plan_posttrain(t, [AttributeConfig(name="spk", kind="speaker"),
    ...                           AttributeConfig(name="sem", kind="semantic", dim=16)],
    ...                       targets=lambda texts, a: pivot_text_embedding(texts, a.dim).numpy())
    >>> plan.speakers, plan.speaker_index.tolist(), plan.semantic["sem"].index.tolist()
    (('s1', 's2'), [1, 0, -1], [0, -1, 1])
    """
    utt_ids = tuple(table.column("utt_id").to_pylist())
    speakers_col = _strings(table, "speaker")
    speakers: tuple[str, ...] = ()
    speaker_index = np.full(len(utt_ids), -1, np.int64)
    semantic: dict[str, SemanticTargets] = {}
    counting: dict[str, dict[str, int]] = {}
    for a in attributes:
        where = f"posttrain.attributes: {a.name!r} ({a.kind})"
        if a.kind == "speaker":
            speakers = tuple(sorted({s for s in speakers_col if s is not None}))
            if len(speakers) < 2:
                raise ConfigError(f"{where} needs training rows of at least 2 speakers; the training manifests "
                                  f"have {len(speakers)} (no row has a speaker field)" if not speakers else
                                  f"{where} needs training rows of at least 2 speakers; the training manifests "
                                  f"have only {speakers[0]!r}")
            pos = {s: i for i, s in enumerate(speakers)}
            speaker_index = np.array([pos[s] if s is not None else -1 for s in speakers_col], np.int64)
        elif a.kind == "semantic":
            if targets is None:
                raise ValueError(f"{where}: plan_posttrain needs targets (text -> vectors) for semantic attributes")
            texts = target_texts(table, a.target_field)
            distinct = sorted({t for t in texts if t is not None})
            if not distinct:
                raise ConfigError(f"{where} needs training rows with a {a.target_field}"
                                  f"{' or text' if a.target_field != 'text' else ''} field; none has one")
            at = {t: i for i, t in enumerate(distinct)}
            index = np.array([at[t] if t is not None else -1 for t in texts], np.int64)
            sentences = _strings(table, "sentence")
            keys = [s if s is not None else (f"target:{t}" if t is not None else None) for s, t in zip(sentences, texts)]
            group_at = {k: i for i, k in enumerate(sorted({k for k in keys if k is not None}))}
            groups = np.array([group_at[k] if k is not None else -1 for k in keys], np.int64)
            try:
                vectors = np.asarray(targets(distinct, a), np.float32)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            semantic[a.name] = SemanticTargets(vectors, index, groups, tuple(distinct))
        else:
            if counting_generator is None:
                raise ValueError(f"{where}: plan_posttrain needs a counting_generator "
                                 "(spear.synthetic.counting.CountingGenerator) for counting attributes")
            counting[a.name] = dict(counting_generator(tasks=a.tasks, duration=clip_seconds).num_classes)
    return PostTrainPlan(attributes=tuple(attributes), utt_ids=utt_ids, speakers=speakers,
                         speaker_index=speaker_index, semantic=semantic, counting=counting,
                         clip_seconds=float(clip_seconds), counting_generator=counting_generator)


class _AttributeStream:
    """One rank's endless stream of row indexes for one labelled attribute (a seeded permutation per
    epoch, the rank's part of it: see the module docstring); ``state`` is a
    :class:`~spear.stages.train_data.StreamState`."""

    def __init__(self, name: str, rows: np.ndarray, utt_ids: Sequence[str], rank: int, world_size: int, seed: int,
                 state: Optional[dict[str, Any]] = None):
        self.name, self.rows, self.rank, self.world_size, self.seed = name, rows, rank, world_size, seed
        self.total = len(rows)
        # which rows, by id: a changed table (new manifests) starts the epoch again
        self.crc = zlib.crc32("\n".join(utt_ids[i] for i in rows).encode())
        st = StreamState.from_dict(state) if state else StreamState()
        if (st.total, st.units_crc) != (self.total, self.crc):
            st = StreamState(epoch=st.epoch)
        elif (st.rank, st.world_size) != (rank, world_size):
            st = StreamState(epoch=st.epoch, base=st.consumed())  # merged (an elastic resize) or another split
        st.rank, st.world_size, st.total, st.units_crc = rank, world_size, self.total, self.crc
        self.state = st
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(self.name.encode())])
            self._perm = (epoch, rng.permutation(self.total))
        return self._perm[1]

    def next(self) -> int:
        while True:
            part = self.state.part()
            at = self.state.pos
            for a, b in part:
                if at < b - a:
                    self.state.pos += 1
                    return int(self.rows[self._permutation(self.state.epoch)[a + at]])
                at -= b - a
            if not part and not self.state.base:
                raise PostTrainDataError(f"attribute {self.name!r} has {self.total} training rows, fewer than the "
                                         f"{self.world_size} workers: rank {self.rank} has none")
            self.state = StreamState(epoch=self.state.epoch + 1, rank=self.rank, world_size=self.world_size,
                                     total=self.total, units_crc=self.crc)


class PostTrainBatches:
    """One rank's batches (:class:`~spear.models.posttrain.PostTrainBatch` plus the rows' ids); ``state()``
    after a batch resumes right after it.

    ``table``: the prepared training rows (at least :data:`COLUMNS`), in the plan's order; ``step``: the
    number of batches this rank's run has taken before (seeds the counting clips and, after an elastic
    resize, the batch RNG).
    """

    def __init__(self, table: pa.Table, plan: PostTrainPlan, *, rank: int, world_size: int, batch_size: int,
                 max_seconds: float, seed: int, state: Optional[dict[str, Any]] = None, step: int = 0):
        if table.num_rows != len(plan.utt_ids):
            raise PostTrainDataError(f"the training table has {table.num_rows} rows, the plan {len(plan.utt_ids)}")
        self.plan, self.rank, self.world_size, self.seed = plan, rank, world_size, seed
        self.batch_size, self.max_samples = int(batch_size), int(round(max_seconds * SAMPLE_RATE))
        self.audio = table.column("audio").combine_chunks()
        state = copy.deepcopy(state) if state else {}
        names = [a.name for a in plan.attributes if a.kind != "counting"]
        self.streams = {n: _AttributeStream(n, plan.eligible(n), plan.utt_ids, rank, world_size, seed,
                                            state.get("streams", {}).get(n)) for n in names}
        weights = np.array([a.sample_weight for a in plan.attributes], np.float64)
        self.probs = weights / weights.sum()
        self.step = int(state.get("step", step))
        self.rng = np.random.default_rng([seed, rank, self.step])
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]

    def state(self) -> dict[str, Any]:
        """Position after the last batch (JSON-serialisable; ranks' states merge with ``resume_state``)."""
        return {"streams": {n: s.state.to_dict() for n, s in self.streams.items()},
                "rng": copy.deepcopy(self.rng.bit_generator.state), "step": self.step}

    def _crop(self, wav: np.ndarray) -> np.ndarray:
        if len(wav) <= self.max_samples:
            return wav
        start = int(self.rng.integers(0, len(wav) - self.max_samples + 1))
        return wav[start: start + self.max_samples]

    def next_batch(self) -> tuple[PostTrainBatch, list[str]]:
        plan = self.plan
        drawn = self.rng.choice(len(plan.attributes), size=self.batch_size, p=self.probs)
        wavs: list[np.ndarray] = []
        ids: list[str] = []
        rows: list[int] = []   # table row per labelled item, -1 for a counting clip
        count_items: list[tuple[str, int, int]] = []  # (attribute, task index, label) per counting clip
        generators: dict[str, Any] = {}
        for k in drawn.tolist():
            a = plan.attributes[k]
            if a.kind == "counting":
                if a.name not in generators:  # per (seed, step, rank, attribute): a resumed step makes the same clips
                    worker = (self.step * 65537 + self.rank) * 64 + k
                    generators[a.name] = plan.counting_generator(tasks=a.tasks, seed=self.seed, worker=worker,
                                                                 duration=plan.clip_seconds)
                gen = generators[a.name]
                item = next(gen)
                wavs.append(item.wav)
                rows.append(-1)
                count_items.append((a.name, gen.task_index(item.task), item.label))
                ids.append(f"{a.name}:{item.task}:{item.label}")
            else:
                i = self.streams[a.name].next()
                wavs.append(self._crop(flac_decode(self.audio[i].as_py())))
                rows.append(i)
                count_items.append(("", -1, -1))
                ids.append(plan.utt_ids[i])
        B = len(wavs)
        lengths = torch.tensor([len(w) for w in wavs], dtype=torch.long)
        out = torch.zeros(B, int(lengths.max()))
        for j, w in enumerate(wavs):
            out[j, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        idx = np.array(rows)
        labelled = idx >= 0
        batch = PostTrainBatch(out, lengths)
        for a in plan.attributes:
            if a.kind == "speaker":
                y = np.full(B, -1, np.int64)
                y[labelled] = plan.speaker_index[idx[labelled]]
                batch.labels[a.name] = torch.from_numpy(y)
            elif a.kind == "semantic":
                sem = plan.semantic[a.name]
                t = np.full(B, -1, np.int64)
                t[labelled] = sem.index[idx[labelled]]
                g = np.full(B, -1, np.int64)
                g[labelled] = sem.groups[idx[labelled]]
                vec = np.full((B, sem.dim), np.nan, np.float32)
                vec[t >= 0] = sem.vectors[t[t >= 0]]
                batch.labels[a.name] = torch.from_numpy(vec)
                batch.masks[a.name] = torch.from_numpy(t >= 0)
                batch.groups[a.name] = torch.from_numpy(g)
            else:
                y = np.array([lab if n == a.name else -1 for n, _, lab in count_items], np.int64)
                task = np.array([ti if n == a.name else 0 for n, ti, _ in count_items], np.int64)
                batch.labels[a.name] = torch.from_numpy(y)
                batch.tasks[a.name] = torch.from_numpy(task)
        self.step += 1
        return batch, ids
