"""Utterance-level embeddings of several systems side by side: speaker verification, cross-lingual
retrieval and counting, each number with its 95 % interval.

A :class:`System` is a name and a function ``(wavs [B, S], lengths [B]) -> {key: [B, D] numpy}``; the
keys are a post-trained model's attribute names (``speaker``, ``semantic``, ``counting``: one
embedding per attribute) or ``pooled`` for a system with one embedding for everything. Three
builders cover what the post-training is measured against:

- :func:`posttrained_system`: a :class:`~spear.models.posttrain.PostTrainModel`'s embeddings per
  attribute, and its counting head's own predictions;
- :func:`mean_pooled_system`: the input model's frame features, every layer normalised per frame
  (no learned affine) and zero-padded to the widest, the layers averaged with equal weights and the
  frames mean-pooled: what the post-trained heads see before any training (their layer weighting
  starts uniform);
- :func:`fbank_system`: the 128-bin Kaldi log-mel fbank, mean- and std-pooled (the floor).

:func:`evaluate_attributes` measures, on an evaluation table (:class:`Utterances`: the prepared
table of ``spear posttrain``, :func:`read_utterances`) and synthetic counting signals:

- **speaker verification** on held-out speakers: rows without a speaker, or whose speaker was seen
  in training, are excluded and counted per reason; trials from
  :func:`~spear.evaluation.verification.build_trials`, cosine scores, EER and minDCF (p_target 0.01
  and 0.05) with 95 % bootstrap intervals over *speakers* (a draw of speakers with replacement keeps
  each drawn speaker's trials: trials are not independent, speakers are), and the DET curve;
- **cross-lingual retrieval**: for every ordered pair of languages (a, b), the speech of language a
  queries the speech of language b; the right answers are the utterances of the same ``sentence``;
  recall@1 and @5 per pair and over all pairs (interval: bootstrap over sentences), the language x
  language recall@1 matrix; and speech -> text: each utterance's semantic embedding against the
  semantic target of every sentence's pivot text (only for a system with a semantic embedding of
  the target's size; otherwise "not applicable" with the reason). With a ``seen_sentence`` column
  (sentences the post-training saw), the same again for seen and unseen sentences apart (queries and
  gallery both restricted to the subset);
- **counting**: a held-out synthetic set (:class:`~spear.synthetic.counting.CountingGenerator`'s
  ``balanced`` items, seed :func:`counting_eval_seed`, never a training seed; made by the caller, as
  evaluation does not import the synthetic layer; split half / half per class) probed per task by :func:`~spear.evaluation.probes.run_probe` on each
  system's counting (else pooled) embedding, and the post-trained counting head's own predictions on
  the same test half; with a demo corpus, its ``event_count`` task (:mod:`spear.evaluation.tasks`)
  probed the same way.

``comparisons`` then names, per metric, which system beats which by more than the CI (the larger
95 % half-width of the two, as :mod:`spear.evaluation.claims`), and the one that beats all others.

Example::

    >>> import numpy as np, torch
    >>> rng = np.random.default_rng(0)
    >>> speakers = [f"s{i % 4}" for i in range(16)]
    >>> centre = {s: rng.normal(size=8) for s in set(speakers)}
    >>> def embed(wavs, lengths):   # a toy system: it knows the speaker by the clip's amplitude
    ...     return {"pooled": np.stack([centre[f"s{int(round(float(w.abs().max()) * 10)) - 1}"]
    ...                                 for w in wavs])}
    >>> utts = Utterances(utt_id=[str(i) for i in range(16)],
    ...                   wavs=[np.full(8000, (i % 4 + 1) / 10, np.float32) for i in range(16)],
    ...                   speaker=speakers)
    >>> res = evaluate_attributes([System("toy", embed)], utts, n_bootstrap=50)
    >>> res["verification"]["systems"]["toy"]["eer"]
    0.0
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from spear.cluster.storage import Storage
from spear.evaluation.claims import half_width
from spear.evaluation.probes import L2_GRID, bootstrap_ci, run_probe
from spear.evaluation.verification import (P_TARGETS, bootstrap_stat_ci, build_trials, cosine_scores, det_curve, eer,
                                           min_dcf, retrieval_recall_at_k)
from spear.models.frontend import KaldiFbank
from spear.models.posttrain import PostTrainModel, pivot_text_embedding
from spear.models.student import StudentModel
from spear.schemas.segments import SAMPLE_RATE
from spear.stages.audio import flac_decode, pcm16_to_float
from spear.stages.batching import plan_subbatches

#: The key of a system's one embedding when it has no per-attribute ones.
POOLED = "pooled"
#: The seed of the held-out counting set. Training draws its signals from ``(posttrain.seed, rank)``
#: streams; :func:`counting_eval_seed` moves off any seed training used.
COUNTING_EVAL_SEED = 1_000_003
#: Retrieval recall is reported at these ranks.
RECALL_KS = (1, 5)
#: DET curves are stored with at most this many points per system (the plot needs no more).
DET_POINTS = 400
FBANK_BINS = 128

EmbedFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]


# ----------------------------------------------------------------------------- systems


@dataclass
class System:
    """One system under evaluation.

    ``embed(wavs [B, S] float32 16 kHz, lengths [B]) -> {key: [B, D]}`` (numpy or tensors);
    ``kinds``: attribute name -> kind (``speaker`` / ``semantic`` / ``counting``) of its keys, empty
    for a system whose only key is :data:`POOLED`; ``counting_head(attribute, emb [N, D], tasks [N]
    names) -> predicted labels [N]`` where the system has a trained counting readout, with
    ``counting_tasks`` (attribute -> the task names it was trained on); ``kind`` (``posttrained``,
    ``mean_pooled``, ``fbank``, ...) and ``info`` for the report.
    """

    name: str
    embed: EmbedFn
    kinds: dict[str, str] = field(default_factory=dict)
    kind: str = "pooled"
    counting_head: Optional[Callable[[str, np.ndarray, Sequence[str]], np.ndarray]] = None
    counting_tasks: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    pooled: bool = False  # a system with attributes whose embed also returns POOLED

    def key_for(self, kind: str) -> Optional[str]:
        """The embedding that serves ``kind``: the first attribute of that kind, else :data:`POOLED` where
        the system has it (a model post-trained without the counting tasks is measured on its encoder's
        pooled features), else None."""
        for name, k in self.kinds.items():
            if k == kind:
                return name
        return POOLED if self.pooled or not self.kinds else None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "attributes": dict(self.kinds),
                "embedding_for": {k: self.key_for(k) for k in ("speaker", "semantic", "counting")}, **self.info}


def posttrained_system(model: PostTrainModel, name: str = "posttrained") -> System:
    """A post-trained model: one embedding per attribute, its encoder's mean-pooled layers (:data:`POOLED`,
    for a kind it has no attribute of), and its counting heads' predictions."""
    model.eval()
    specs = dict(model.attributes)

    def embed(wavs: torch.Tensor, lengths: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = model(wavs, lengths)
            # the encoder's own layers mean-pooled, as the input model's (for attributes it was not trained for)
            pooled, _ = _masked_mean_std(_layer_average(out.features.layers), out.features.lengths)
        return {POOLED: pooled.cpu().numpy(), **{k: v.float().cpu().numpy() for k, v in out.embeddings.items()}}

    def head(attribute: str, emb: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
        order = list(specs[attribute].tasks)
        device = next(model.heads.parameters()).device
        idx = torch.tensor([order.index(t) for t in tasks], dtype=torch.long, device=device)
        with torch.inference_mode():
            pred = model.losses[attribute].predict(torch.as_tensor(emb, dtype=torch.float32, device=device), idx)
        return pred.cpu().numpy()

    counting = {n: list(s.tasks) for n, s in specs.items() if s.kind == "counting"}
    return System(name, embed, {n: s.kind for n, s in specs.items()}, "posttrained",
                  head if counting else None, counting,
                  {"dims": {n: int(s.dim) for n, s in specs.items()}, "freeze": model.freeze}, pooled=True)


def _layer_average(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every layer normalised per frame and zero-padded to the widest, averaged with equal weights
    (:class:`~spear.models.posttrain.LayerWeighting` at its start)."""
    width = max(int(x.shape[-1]) for x in layers)
    out = None
    for x in layers:
        x = F.layer_norm(x.float(), (int(x.shape[-1]),))
        x = F.pad(x, (0, width - int(x.shape[-1])))
        out = x if out is None else out + x
    return out / len(layers)


def _masked_mean_std(x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the first ``n[b]`` frames of ``x`` [B, T, D] (zeros for empty rows)."""
    T = x.shape[1]
    m = (torch.arange(T, device=x.device)[None, :] < n.to(x.device)[:, None]).unsqueeze(-1).to(x.dtype)
    cnt = m.sum(1).clamp_min(1.0)
    mean = (x * m).sum(1) / cnt
    var = ((x - mean.unsqueeze(1)) ** 2 * m).sum(1) / cnt
    return mean, var.clamp_min(0.0).sqrt()


def mean_pooled_system(student: StudentModel, name: str = "input", layers: Union[str, Sequence[int]] = "all"
                       ) -> System:
    """The input model's mean-pooled frame features: the chosen layers (``"all"``, ``"last"`` or 1-based
    numbers, as :func:`spear.evaluation.features.select_layers`) averaged as :func:`_layer_average`."""
    from spear.evaluation.features import select_layers  # one choice of layers for probes and here

    keep = select_layers(student.num_layers, layers)
    student.eval()

    def embed(wavs: torch.Tensor, lengths: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            feats = student.features(wavs, lengths)
            x = _layer_average([feats.layers[i - 1] for i in keep])
            mean, _ = _masked_mean_std(x, feats.lengths)
        return {POOLED: mean.cpu().numpy()}

    return System(name, embed, {}, "mean_pooled", info={"layers": keep, "layer_dims": list(student.layer_dims)})


def fbank_system(name: str = "fbank", with_std: bool = True, device: Union[str, torch.device] = "cpu") -> System:
    """The raw 128-bin Kaldi log-mel fbank, mean-pooled over frames (and std-pooled: ``with_std``)."""
    fbank = KaldiFbank(num_mel_bins=FBANK_BINS).to(device)

    def embed(wavs: torch.Tensor, lengths: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            feats, nf = fbank(wavs.to(device), lengths.to(device))
            mean, std = _masked_mean_std(feats, nf)
        return {POOLED: torch.cat([mean, std], -1).cpu().numpy() if with_std else mean.cpu().numpy()}

    return System(name, embed, {}, "fbank", info={"bins": FBANK_BINS, "pooling": "mean+std" if with_std else "mean"})


def embed_all(system: System, wavs: Sequence[np.ndarray], batch_seconds: float = 60.0) -> dict[str, np.ndarray]:
    """``system``'s embeddings of every waveform (float32 16 kHz), in input order: clips run shortest
    first in batches of at most ``batch_seconds`` of padded audio (zero-length clips too: their rows are
    whatever the system gives an empty clip)."""
    lengths = np.array([len(w) for w in wavs], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    out: dict[str, np.ndarray] = {}
    for batch in plan_subbatches(lengths, int(batch_seconds * SAMPLE_RATE), order=order):
        S = max(int(lengths[batch].max()), 1)
        x = torch.zeros(len(batch), S)
        for b, i in enumerate(batch):
            x[b, : lengths[i]] = torch.as_tensor(np.asarray(wavs[i], dtype=np.float32))
        emb = system.embed(x, torch.as_tensor(lengths[batch]))
        for key, v in emb.items():
            v = v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32)
            if v.shape[0] != len(batch):
                raise ValueError(f"system {system.name!r}: embedding {key!r} has {v.shape[0]} rows for a batch of "
                                 f"{len(batch)}")
            if key not in out:
                out[key] = np.zeros((len(wavs), v.shape[1]), np.float32)
            out[key][batch] = v
    return out


# ----------------------------------------------------------------------------- the evaluation table


@dataclass
class Utterances:
    """Held-out utterances: ids, float32 16 kHz waveforms and labels (None where unknown); ``seen``:
    whether each utterance's sentence was in the post-training data (None: not marked); ``skipped``:
    rows of the table left out, per reason."""

    utt_id: list[str]
    wavs: list[np.ndarray]
    speaker: Optional[list[Optional[str]]] = None
    language: Optional[list[Optional[str]]] = None
    text: Optional[list[Optional[str]]] = None
    pivot: Optional[list[Optional[str]]] = None
    sentence: Optional[list[Optional[str]]] = None
    seen: Optional[list[Optional[bool]]] = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.utt_id)
        for name in ("wavs", "speaker", "language", "text", "pivot", "sentence", "seen"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"Utterances.{name} has {len(v)} rows, utt_id {n}")

    def __len__(self) -> int:
        return len(self.utt_id)

    def column(self, name: str) -> list[Optional[str]]:
        """A label column with empty strings as None (all None when the column is absent)."""
        v = getattr(self, name)
        if v is None:
            return [None] * len(self)
        return [None if x is None or (isinstance(x, str) and not x.strip()) else str(x) for x in v]


def utterances_from_table(table: Any) -> Utterances:
    """:class:`Utterances` from a prepared table (``spear posttrain``'s ``eval.parquet``: utt_id, audio FLAC
    bytes, speaker, language, text, pivot, sentence[, seen_sentence]); a pyarrow Table or a list of dicts.
    A ``sentence`` that is missing falls back to the pivot text (translations of one sentence share it).
    A row whose audio does not decode is left out and counted in ``skipped``."""
    rows = table.to_pylist() if hasattr(table, "to_pylist") else list(table)
    if rows and ("utt_id" not in rows[0] or "audio" not in rows[0]):
        raise ValueError(f"an evaluation table needs utt_id and audio columns, got {sorted(rows[0])}")
    wavs, kept, skipped = [], [], {}
    for r in rows:
        try:
            wavs.append(flac_decode(r["audio"]))
            kept.append(r)
        except (RuntimeError, ValueError, TypeError) as exc:  # soundfile: LibsndfileError is a RuntimeError
            reason = f"audio does not decode ({type(exc).__name__})"
            skipped[reason] = skipped.get(reason, 0) + 1
    rows = kept

    def col(name: str) -> Optional[list[Any]]:
        return [r.get(name) for r in rows] if rows and name in rows[0] else None

    sentence = col("sentence")
    pivot = col("pivot")
    if pivot is not None:
        sentence = [s if s not in (None, "") else p for s, p in zip(sentence or [None] * len(rows), pivot)]
    seen = col("seen_sentence")
    return Utterances([str(r["utt_id"]) for r in rows], wavs, col("speaker"), col("language"), col("text"), pivot,
                      sentence, None if seen is None else [None if v is None else bool(v) for v in seen], skipped)


def read_utterances(uri: str, storage: Optional[Storage] = None) -> Utterances:
    """The prepared evaluation table at ``uri`` (a Parquet file, local or s3://) as :class:`Utterances`."""
    import pyarrow.parquet as pq

    storage = storage or Storage()
    return utterances_from_table(pq.read_table(io.BytesIO(storage.read_bytes(uri))))


# ----------------------------------------------------------------------------- verification


def _det_points(fa: np.ndarray, miss: np.ndarray, n: int = DET_POINTS) -> dict[str, list[float]]:
    """At most ``n`` operating points of a DET curve, evenly spaced along it, both ends kept."""
    idx = np.unique(np.linspace(0, len(fa) - 1, min(n, len(fa))).round().astype(int))
    return {"fa": [float(v) for v in fa[idx]], "miss": [float(v) for v in miss[idx]]}


def verification(embeddings: Mapping[str, np.ndarray], speakers: Sequence[str], *, max_target: Optional[int] = 20000,
                 n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Speaker verification of each system's embeddings [N, D] of the same utterances of ``speakers``.

    One set of trials for all systems; EER, minDCF at :data:`~spear.evaluation.verification.P_TARGETS`,
    their 95 % bootstrap intervals over speakers, and the DET curve per system."""
    trials = build_trials(speakers, max_target=max_target, seed=seed)
    spk = np.asarray(speakers, dtype=object).astype(str)
    names, ids = np.unique(spk, return_inverse=True)
    ls, rs = ids[trials.left], ids[trials.right]
    y = trials.target
    arange = np.arange(len(y))

    def resampled(speaker_draw: np.ndarray) -> np.ndarray:
        """The trials of a bootstrap draw of speakers: a speaker drawn m times brings its target
        trials m times and its non-target trials with a speaker drawn m' times m * m' times."""
        m = np.bincount(speaker_draw, minlength=len(names))
        return np.repeat(arange, np.where(y, m[ls], m[ls] * m[rs]))

    def speaker_ci(stat: Callable[[np.ndarray], float]) -> list[float]:
        return list(bootstrap_stat_ci(lambda draw: stat(resampled(draw)), len(names), n_resamples=n_bootstrap,
                                      seed=seed))

    out: dict[str, Any] = {"trials": {"target": int(y.sum()), "nontarget": int((~y).sum()),
                                      "speakers": int(len(names)), "utterances": int(len(spk)),
                                      "ci": "95 % bootstrap over speakers"},
                           "systems": {}}
    for name, emb in embeddings.items():
        scores = cosine_scores(emb, trials.left, trials.right)
        e, thr = eer(scores, y)
        res: dict[str, Any] = {"eer": e, "eer_threshold": thr,
                               "eer_ci": speaker_ci(lambda idx: eer(scores[idx], y[idx])[0])}
        res["min_dcf"], res["min_dcf_ci"] = {}, {}
        for p in P_TARGETS:
            res["min_dcf"][str(p)] = min_dcf(scores, y, p)[0]
            res["min_dcf_ci"][str(p)] = speaker_ci(lambda idx, p=p: min_dcf(scores[idx], y[idx], p)[0])
        fa, miss, _ = det_curve(scores, y)
        res["det"] = _det_points(fa, miss)
        out["systems"][name] = res
    return out


# ----------------------------------------------------------------------------- retrieval


def _recall_summary(hits: dict[int, list[np.ndarray]], groups: list[np.ndarray], n_bootstrap: int,
                    seed: int) -> dict[str, Any]:
    """Recall@k over queries pooled from several retrievals, interval by bootstrap over sentences."""
    g = np.concatenate(groups) if groups else np.zeros(0, str)
    out: dict[str, Any] = {"recall": {}, "recall_ci": {}, "num_queries": int(len(g))}
    for k, hs in hits.items():
        h = np.concatenate(hs).astype(float) if hs else np.zeros(0)
        out["recall"][f"R@{k}"] = float(h.mean()) if len(h) else float("nan")
        out["recall_ci"][f"R@{k}"] = list(bootstrap_ci(h, g, n_resamples=n_bootstrap, seed=seed))
    return out


def speech_retrieval(emb: np.ndarray, language: Sequence[str], sentence: Sequence[str], *,
                     n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Speech (language a) -> speech (language b) retrieval of the same sentence, for every ordered pair
    of languages; recall@k per pair, pooled over pairs, and the language x language recall@1 matrix."""
    lang, sent = np.asarray(language, dtype=object).astype(str), np.asarray(sentence, dtype=object).astype(str)
    langs = sorted(set(lang.tolist()))
    pairs: dict[str, Any] = {}
    hits: dict[int, list[np.ndarray]] = {k: [] for k in RECALL_KS}
    groups: list[np.ndarray] = []
    matrix = [[None] * len(langs) for _ in langs]
    for a, b in permutations(langs, 2):
        q, g = np.flatnonzero(lang == a), np.flatnonzero(lang == b)
        matched = np.isin(sent[q], sent[g])
        if not matched.any():
            continue
        r = retrieval_recall_at_k(emb[q], emb[g], sent[q], sent[g], ks=RECALL_KS, n_bootstrap=n_bootstrap, seed=seed,
                                  group_ci_by_id=True)
        pairs[f"{a}->{b}"] = r.as_dict()
        matrix[langs.index(a)][langs.index(b)] = r.recall[1]
        for k in RECALL_KS:
            hits[k].append(r.hits[k][matched])
        groups.append(sent[q][matched])
    out = _recall_summary(hits, groups, n_bootstrap, seed)
    out.update(languages=langs, matrix=matrix, pairs=pairs)
    return out


def text_retrieval(emb: np.ndarray, targets: np.ndarray, language: Sequence[str], sentence: Sequence[str],
                   target_ids: Sequence[str], *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Speech -> text: each utterance's embedding against every sentence's target embedding; recall@k
    over all queries (interval over sentences) and recall@1 per query language."""
    lang, sent = np.asarray(language, dtype=object).astype(str), np.asarray(sentence, dtype=object).astype(str)
    r = retrieval_recall_at_k(emb, targets, sent, list(target_ids), ks=RECALL_KS, n_bootstrap=n_bootstrap, seed=seed,
                              group_ci_by_id=True)
    out = r.as_dict()
    out["by_language"] = {a: float(r.hits[1][lang == a].mean()) for a in sorted(set(lang.tolist()))}
    out["gallery"] = int(len(target_ids))
    return out


# ----------------------------------------------------------------------------- counting


def counting_eval_seed(training_seeds: Sequence[int] = ()) -> int:
    """:data:`COUNTING_EVAL_SEED`, moved past any seed in ``training_seeds``.

    >>> counting_eval_seed([0, COUNTING_EVAL_SEED])
    1000004
    """
    seed = COUNTING_EVAL_SEED
    while seed in set(int(s) for s in training_seeds):
        seed += 1
    return seed


def _probe_block(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 seeds: Sequence[int], l2_grid: Sequence[float], n_bootstrap: int) -> tuple[dict[str, Any], np.ndarray]:
    """(JSON-ready probe result, per test item the share of seeds that got it right)."""
    res = run_probe(x_train, y_train, x_test, y_test, seeds=seeds, l2_grid=l2_grid, n_bootstrap=n_bootstrap)
    correct = np.mean([p == y_test for p in res.test_predictions], axis=0)
    return {"accuracy": res.score, "ci": list(res.ci), "chance": res.chance, "macro_f1": res.macro_f1,
            "num_train": res.num_train, "num_test": res.num_test, "num_classes": res.num_classes}, correct


def synthetic_counting(systems: Sequence[System], items: Sequence[Any], *, info: Optional[Mapping[str, Any]] = None,
                       seeds: Sequence[int] = (0, 1, 2), l2_grid: Sequence[float] = L2_GRID,
                       n_bootstrap: int = 1000, batch_seconds: float = 60.0,
                       log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Counting accuracy on a held-out synthetic set: a probe per task on each system's counting (else
    pooled) embedding, overall (every test item of every task) with its interval, and a post-trained
    counting head's own predictions on the same test items.

    ``items``: objects with ``wav`` (float32 16 kHz), ``task`` and ``label`` (the
    :class:`~spear.synthetic.counting.CountingItem` of a generator's ``balanced`` set, made by the
    caller: evaluation does not import the synthetic layer); the items of every (task, label) alternate
    between the probe's training and test halves. ``info`` (seed, clip length, ...) is reported as is.
    """
    task = np.array([str(it.task) for it in items])
    label = np.array([int(it.label) for it in items])
    tasks = list(dict.fromkeys(task.tolist()))
    test = np.zeros(len(items), bool)
    for t in tasks:
        for c in sorted(set(label[task == t].tolist())):
            idx = np.flatnonzero((task == t) & (label == c))
            test[idx[1::2]] = True
    out: dict[str, Any] = {**dict(info or {}), "tasks": tasks,
                           "num_classes": {t: int(len(set(label[task == t].tolist()))) for t in tasks},
                           "num_train": int((~test).sum()), "num_test": int(test.sum()), "systems": {}}
    wavs = [it.wav for it in items]
    for s in systems:
        key = s.key_for("counting")
        if key is None:
            out["systems"][s.name] = {"not_applicable": "no counting embedding"}
            continue
        emb = embed_all(s, wavs, batch_seconds)[key]
        per_task, correct = {}, np.zeros(len(items))
        for t in tasks:
            tr, te = (task == t) & ~test, (task == t) & test
            per_task[t], correct[te] = _probe_block(emb[tr], label[tr], emb[te], label[te], seeds, l2_grid,
                                                    n_bootstrap)
        c = correct[test]
        res: dict[str, Any] = {"embedding": key, "probe": {"accuracy": float(c.mean()),
                                                           "ci": list(bootstrap_ci(c, n_resamples=n_bootstrap)),
                                                           "tasks": per_task}}
        trained = s.counting_tasks.get(key)
        if s.counting_head is not None and trained:
            rows = test & np.isin(task, trained)
            pred = s.counting_head(key, emb[rows], list(task[rows]))
            ok = (np.asarray(pred) == label[rows]).astype(float)
            res["head"] = {"accuracy": float(ok.mean()), "ci": list(bootstrap_ci(ok, n_resamples=n_bootstrap)),
                           "tasks": {t: float(ok[task[rows] == t].mean()) for t in trained if t in tasks},
                           "num_test": int(rows.sum())}
        out["systems"][s.name] = res
        log(f"[attributes] counting {s.name}: probe {res['probe']['accuracy']:.3f}"
            + (f", head {res['head']['accuracy']:.3f}" if "head" in res else ""))
    return out


def event_count(systems: Sequence[System], corpus_root: str, storage: Storage, *, seeds: Sequence[int] = (0, 1, 2),
                l2_grid: Sequence[float] = L2_GRID, n_bootstrap: int = 1000, batch_seconds: float = 60.0
                ) -> dict[str, Any]:
    """The demo corpus's ``event_count`` task (:mod:`spear.evaluation.tasks`), probed on each system's
    counting (else pooled) embedding with the corpus's own train / test split."""
    from spear.evaluation.clips import decode_clips
    from spear.evaluation.tasks import TaskSources, load_tasks, task_arrays

    tasks, items = load_tasks(TaskSources(corpus_root, (), ["event_count"]), storage)
    clips, skipped = decode_clips({i: items.uris[i] for i in tasks[0].items}, storage)
    task = tasks[0].keep(lambda i: i in clips)
    ids = sorted(clips)
    out: dict[str, Any] = {"corpus": str(corpus_root), "files": len(ids), "skipped_files": skipped, "systems": {}}
    for s in systems:
        key = s.key_for("counting")
        if key is None:
            out["systems"][s.name] = {"not_applicable": "no counting embedding"}
            continue
        emb = embed_all(s, [pcm16_to_float(clips[i].pcm) for i in ids], batch_seconds)[key]
        pooled = np.zeros((len(items.uris), emb.shape[1]), np.float32)
        pooled[ids] = emb
        xtr, ytr, xte, yte, _, _ = task_arrays(task, pooled, {}, {})
        out["systems"][s.name] = dict(_probe_block(xtr, ytr, xte, yte, seeds, l2_grid, n_bootstrap)[0], embedding=key)
    return out


# ----------------------------------------------------------------------------- comparisons


def compare(values: Mapping[str, tuple[float, Sequence[float]]], higher_is_better: bool) -> dict[str, Any]:
    """Which system beats which by more than the CI: ``values``: system -> (value, [lo, hi]).

    A beats B when its value is better by more than the larger 95 % half-width of the two
    (:func:`spear.evaluation.claims.half_width`); ``best``: the system that beats every other (None
    when none does, or with fewer than two systems).

    >>> r = compare({"a": (0.9, [0.85, 0.95]), "b": (0.5, [0.4, 0.6]), "c": (0.88, [0.8, 0.96])}, True)
    >>> r["better"], r["best"]
    ([['a', 'b'], ['c', 'b']], None)
    """
    sign = 1.0 if higher_is_better else -1.0
    names = [n for n, (v, _) in values.items() if v is not None and not math.isnan(v)]
    better = []
    for a in names:
        for b in names:
            if a == b:
                continue
            (va, ca), (vb, cb) = values[a], values[b]
            hw = max(half_width({"ci": list(ca)}), half_width({"ci": list(cb)}))
            if sign * (va - vb) > hw + 1e-12:
                better.append([a, b])
    best = [a for a in names if len(names) > 1 and sum(1 for w, _ in better if w == a) == len(names) - 1]
    return {"higher_is_better": higher_is_better, "values": {n: [values[n][0], list(values[n][1])] for n in names},
            "better": better, "best": best[0] if best else None}


def _comparisons(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ver = res.get("verification", {}).get("systems", {})
    ver = {n: v for n, v in ver.items() if "eer" in v}
    if ver:
        out["verification/eer"] = compare({n: (v["eer"], v["eer_ci"]) for n, v in ver.items()}, False)
        for p in P_TARGETS:
            out[f"verification/min_dcf@{p}"] = compare(
                {n: (v["min_dcf"][str(p)], v["min_dcf_ci"][str(p)]) for n, v in ver.items()}, False)
    for subset, block in res.get("retrieval", {}).get("subsets", {}).items():
        for kind in ("speech_to_speech", "speech_to_text"):
            sys = {n: v for n, v in block.get(kind, {}).items() if "recall" in v}
            for k in RECALL_KS:
                if sys:
                    out[f"retrieval/{subset}/{kind}/R@{k}"] = compare(
                        {n: (v["recall"][f"R@{k}"], v["recall_ci"][f"R@{k}"]) for n, v in sys.items()}, True)
    syn = {n: v for n, v in res.get("counting", {}).get("synthetic", {}).get("systems", {}).items() if "probe" in v}
    if syn:
        out["counting/synthetic/probe"] = compare({n: (v["probe"]["accuracy"], v["probe"]["ci"])
                                                   for n, v in syn.items()}, True)
    ev = {n: v for n, v in res.get("counting", {}).get("event_count", {}).get("systems", {}).items()
          if "accuracy" in v}
    if ev:
        out["counting/event_count/probe"] = compare({n: (v["accuracy"], v["ci"]) for n, v in ev.items()}, True)
    return out


# ----------------------------------------------------------------------------- the whole evaluation


TextTargets = Callable[[Sequence[str], int], np.ndarray]


def weight_free_targets(texts: Sequence[str], dim: int) -> np.ndarray:
    """The weight-free semantic targets (:func:`~spear.models.posttrain.pivot_text_embedding`)."""
    return pivot_text_embedding(list(texts), dim).numpy()


def evaluate_attributes(systems: Sequence[System], utterances: Optional[Utterances] = None, *,
                        train_speakers: Sequence[str] = (), text_targets: Optional[TextTargets] = weight_free_targets,
                        target_field: str = "pivot", counting_items: Optional[Sequence[Any]] = None,
                        counting_info: Optional[Mapping[str, Any]] = None, corpus_root: Optional[str] = None,
                        storage: Optional[Storage] = None, probe_seeds: Sequence[int] = (0, 1, 2),
                        l2_grid: Sequence[float] = L2_GRID, n_bootstrap: int = 1000, max_target_trials: int = 20000,
                        seed: int = 0, batch_seconds: float = 60.0,
                        log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Every attribute metric for ``systems``: a JSON-ready dict (see the module docstring).

    ``utterances``: the held-out table (None: no verification or retrieval). ``train_speakers``: the
    post-training's speakers, excluded from verification. ``text_targets(texts, dim) -> [N, dim]``:
    the semantic targets of texts (None: no speech -> text); ``target_field``: which text is a row's target,
    ``pivot`` (falling back to the transcript where a row has none, as in training) or ``text``. ``counting_items``: the held-out
    synthetic counting set (:func:`synthetic_counting`; None: skipped), ``counting_info`` its provenance. ``corpus_root``: a demo corpus for ``event_count``.
    """
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
    res: dict[str, Any] = {"systems": [s.describe() for s in systems]}
    if utterances is not None and len(utterances):
        if target_field not in ("pivot", "text"):
            raise ValueError(f"target_field must be 'pivot' or 'text', got {target_field!r}")
        res.update(_table_metrics(systems, utterances, train_speakers, text_targets, target_field, n_bootstrap,
                                  max_target_trials, seed, batch_seconds, log))
    if counting_items is not None or corpus_root is not None:
        res["counting"] = {}
    if counting_items is not None:
        res["counting"]["synthetic"] = synthetic_counting(systems, counting_items, info=counting_info,
                                                          seeds=probe_seeds, l2_grid=l2_grid, n_bootstrap=n_bootstrap,
                                                          batch_seconds=batch_seconds, log=log)
    if corpus_root is not None:
        res["counting"]["event_count"] = event_count(systems, corpus_root, storage or Storage(), seeds=probe_seeds,
                                                     l2_grid=l2_grid, n_bootstrap=n_bootstrap,
                                                     batch_seconds=batch_seconds)
    res["comparisons"] = _comparisons(res)
    return res


def _table_metrics(systems: Sequence[System], utts: Utterances, train_speakers: Sequence[str],
                   text_targets: Optional[TextTargets], target_field: str, n_bootstrap: int, max_target: int,
                   seed: int, batch_seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    speaker, language, sentence, pivot, text = (utts.column(c) for c in ("speaker", "language", "sentence", "pivot",
                                                                          "text"))
    # each row's semantic target text, as training chose it
    target = text if target_field == "text" else [p if p is not None else t for p, t in zip(pivot, text)]
    seen = utts.seen
    embs: dict[str, dict[str, np.ndarray]] = {}
    for s in systems:
        embs[s.name] = embed_all(s, utts.wavs, batch_seconds)
        log(f"[attributes] embedded {len(utts)} utterances with {s.name}")
    out: dict[str, Any] = {"data": {"utterances": len(utts), "excluded": {"table": dict(utts.skipped)}}}

    # Verification: held-out speakers only.
    known = set(str(s) for s in train_speakers)
    reasons: dict[str, int] = {}
    keep = []
    for i, spk in enumerate(speaker):
        if spk is None:
            reasons["no speaker label"] = reasons.get("no speaker label", 0) + 1
        elif spk in known:
            reasons["speaker seen in training"] = reasons.get("speaker seen in training", 0) + 1
        else:
            keep.append(i)
    out["data"]["excluded"]["verification"] = reasons
    spk_kept = [speaker[i] for i in keep]
    try:
        if not keep:
            raise ValueError("no held-out utterance with a speaker label")
        usable = [s for s in systems if s.key_for("speaker")]
        out["verification"] = verification({s.name: embs[s.name][s.key_for("speaker")][keep] for s in usable},
                                           spk_kept, max_target=max_target, n_bootstrap=n_bootstrap, seed=seed)
        for s in systems:
            if s in usable:
                out["verification"]["systems"][s.name]["embedding"] = s.key_for("speaker")
            else:
                out["verification"]["systems"][s.name] = {"not_applicable": "no speaker embedding"}
    except ValueError as exc:
        out["verification"] = {"not_applicable": str(exc)}

    # Retrieval: rows with a sentence and a language.
    reasons = {}
    rows = []
    for i in range(len(utts)):
        if sentence[i] is None:
            reasons["no sentence id"] = reasons.get("no sentence id", 0) + 1
        elif language[i] is None:
            reasons["no language"] = reasons.get("no language", 0) + 1
        else:
            rows.append(i)
    out["data"]["excluded"]["retrieval"] = reasons
    subsets = {"all": rows}
    if seen is not None and any(v is not None for v in seen):
        subsets["seen"] = [i for i in rows if seen[i] is True]
        subsets["unseen"] = [i for i in rows if seen[i] is False]
    langs = sorted({language[i] for i in rows})
    retrieval: dict[str, Any] = {"languages": langs, "subsets": {}}
    if len(langs) < 2:
        retrieval["not_applicable"] = f"cross-lingual retrieval needs two languages, the table has {langs}"
    for name, idx in subsets.items():
        if len(langs) < 2 or not idx:
            continue
        lang_s, sent_s = [language[i] for i in idx], [sentence[i] for i in idx]
        block: dict[str, Any] = {"utterances": len(idx), "sentences": len(set(sent_s)),
                                 "speech_to_speech": {}, "speech_to_text": {}}
        for s in systems:
            key = s.key_for("semantic")
            if key is None:
                block["speech_to_speech"][s.name] = block["speech_to_text"][s.name] = {
                    "not_applicable": "no semantic embedding"}
                continue
            r = speech_retrieval(embs[s.name][key][idx], lang_s, sent_s, n_bootstrap=n_bootstrap, seed=seed)
            block["speech_to_speech"][s.name] = dict(r, embedding=key)
            block["speech_to_text"][s.name] = _speech_to_text(s, embs[s.name], idx, target, lang_s, sent_s,
                                                              text_targets, n_bootstrap, seed)
        retrieval["subsets"][name] = block
    out["retrieval"] = retrieval
    return out


def _speech_to_text(system: System, emb: dict[str, np.ndarray], idx: list[int], target: list[Optional[str]],
                    lang: list[str], sent: list[str], text_targets: Optional[TextTargets], n_bootstrap: int,
                    seed: int) -> dict[str, Any]:
    key = system.key_for("semantic")
    if key in (None, POOLED):
        return {"not_applicable": "no semantic embedding (speech -> text needs one aligned with the text targets)"}
    if text_targets is None:
        return {"not_applicable": "no text targets given"}
    rows = [k for k, i in enumerate(idx) if target[i] is not None]
    if not rows:
        return {"not_applicable": "no utterance has a target text"}
    gallery = list(dict.fromkeys((sent[k], target[idx[k]]) for k in rows))  # one item per distinct text of a sentence
    ids = [g[0] for g in gallery]
    dim = int(emb[key].shape[1])
    try:
        targets = np.asarray(text_targets([g[1] for g in gallery], dim), dtype=np.float32)
    except ValueError as exc:
        return {"not_applicable": f"text targets: {exc}"}
    if targets.ndim != 2 or targets.shape[1] != dim:
        return {"not_applicable": f"the text targets have size {targets.shape[-1]}, the semantic embedding {dim}"}
    r = text_retrieval(emb[key][[idx[k] for k in rows]], targets, [lang[k] for k in rows], [sent[k] for k in rows],
                       ids, n_bootstrap=n_bootstrap, seed=seed)
    return dict(r, embedding=key)
