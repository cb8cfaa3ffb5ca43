"""Teacher stage: a Ray Data actor that turns segment rows into teacher embeddings (or tokens).

:class:`TeacherStage` loads one teacher per actor (once, in ``__init__``) and maps a batch
of segment rows (``segment_id``, ``audio`` = FLAC bytes, ``num_samples``, ...) to the same
rows plus, for a ``column_prefix`` of ``"speech"``:

- ``speech_emb``: the segment's embeddings, float32 [T * D] flattened (T = num_frames, D = teacher.dim), or
- ``speech_tokens``: when an ``encode`` hook is given (the MVQ encoder, fused into this
  actor so embeddings never reach storage), the tokens as raw uint8 bytes [T * C], row-major;
- ``speech_num_frames``: int32 T.

Inside a batch the segments are sorted by length and cut into sub-batches of at most
``teacher.batch_seconds`` of padded audio, which keeps padding low (see
``bench/teacher.py``). Padding waste (padded samples / samples computed) is kept in
``stage.stats`` and exported as Ray metrics ``spear_teacher_samples`` /
``spear_teacher_padded_samples`` (tag ``teacher``).

GPU + ``cfg.dtype`` autocast when CUDA is present; CPU float32 otherwise.

Example::

    import ray
    from spear.config import TeacherConfig
    from spear.stages.teacher import TeacherStage, plan_teacher_pool, teacher_stage_kwargs

    cfg = TeacherConfig(kind="mfcc")
    pool = plan_teacher_pool(cfg)                     # from the cluster's GPUs / CPUs
    out = segments.map_batches(TeacherStage, **teacher_stage_kwargs(pool.map_batches_kwargs(), teacher=cfg,
                                                                    column_prefix="speech"))
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from spear.cluster.storage import Storage, StorageOptions
from spear.models.teachers import Teacher
from spear.stages.teacher_loading import load_teacher
from spear.config import TeacherConfig
from spear.stages.audio import flac_decode
from spear.stages.batching import plan_subbatches

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# The encode hook: frames [N, D] float32 on the teacher's device (several segments' valid frames
# concatenated, one call per sub-batch) -> tokens [N, C] uint8 (tensor or array).
EncodeFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass
class TeacherStats:
    """Running totals of one stage instance."""

    segments: int = 0
    batches: int = 0  # teacher calls (sub-batches)
    samples: int = 0  # real audio samples
    padded_samples: int = 0  # zero samples added to fill sub-batches
    frames: int = 0

    @property
    def padding_waste(self) -> float:
        """Padded samples / samples computed (real + padding)."""
        total = self.samples + self.padded_samples
        return self.padded_samples / total if total else 0.0


class TeacherStage:
    """Ray Data callable class: segment rows in, the rows plus teacher embeddings or tokens out.

    Args:
        teacher: a TeacherConfig (or its dict form).
        storage_options: for checkpoints in object storage (None: local paths / AWS environment).
        column_prefix: output columns are ``<prefix>_emb`` or ``<prefix>_tokens`` and ``<prefix>_num_frames``.
        encode: optional hook mapping frames [N, D] to uint8 tokens [N, C] (see ``EncodeFn``).
        encode_factory: alternatively, called once in the actor with the loaded teacher and
            returning the hook: for an encoder that must be built where it runs (codebooks loaded
            from storage, placed on the teacher's device).
        cache_dir: local cache for remote checkpoints.
        device: force a device (default: CUDA if present).
        num_threads: torch intra-op threads on CPU (default: torch's choice).
        only_domains: run the teacher only on rows whose ``domain`` is one of these (the audio teacher:
            ``("audio",)``); other rows pass through with no tokens (None) and 0 frames.
    """

    def __init__(self, teacher: TeacherConfig | Mapping[str, Any], storage_options: StorageOptions | None = None,
                 column_prefix: str = "speech", encode: EncodeFn | None = None,
                 encode_factory: Callable[[Teacher], EncodeFn] | None = None, cache_dir: str | None = None,
                 device: str | None = None, num_threads: int | None = None,
                 only_domains: Sequence[str] | None = None):
        if encode is not None and encode_factory is not None:
            raise ValueError("give either encode or encode_factory, not both")
        cfg = teacher if isinstance(teacher, TeacherConfig) else TeacherConfig.model_validate(dict(teacher))
        if num_threads:
            torch.set_num_threads(num_threads)
        storage = Storage(storage_options) if storage_options is not None else None
        self.cfg = cfg
        self.teacher: Teacher = load_teacher(cfg, storage=storage, device=device, cache_dir=cache_dir)
        self.prefix = column_prefix
        self.encode = encode_factory(self.teacher) if encode_factory is not None else encode
        self.max_samples = int(cfg.batch_seconds * self.teacher.sample_rate)
        self.only_domains = set(only_domains) if only_domains is not None else None
        self.stats = TeacherStats()
        self._metrics = _ray_counters(self.teacher.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audio = batch["audio"]
        n = len(audio)
        skip = (np.array([d not in self.only_domains for d in batch["domain"]], dtype=bool)
                if self.only_domains is not None else np.zeros(n, dtype=bool))
        wavs = [flac_decode(bytes(a)) if a is not None and len(a) and not skip[i] else np.zeros(0, np.float32)
                for i, a in enumerate(audio)]
        if "num_samples" in batch:
            for i, (w, ns) in enumerate(zip(wavs, batch["num_samples"])):
                if audio[i] is not None and not skip[i] and len(w) != int(ns):
                    sid = batch["segment_id"][i] if "segment_id" in batch else i
                    raise ValueError(f"segment {sid}: audio decodes to {len(w)} samples, num_samples says {int(ns)}")
        lengths = np.array([len(w) for w in wavs], dtype=np.int64)
        values = np.empty(n, dtype=object)
        num_frames = np.zeros(n, dtype=np.int32)
        for idx in plan_subbatches(lengths, self.max_samples):
            self._run(idx, wavs, lengths, values, num_frames)
        values[skip] = None
        out = dict(batch)
        out[f"{self.prefix}_tokens" if self.encode is not None else f"{self.prefix}_emb"] = values
        out[f"{self.prefix}_num_frames"] = num_frames
        return out

    def _run(self, idx: np.ndarray, wavs: list[np.ndarray], lengths: np.ndarray, values: np.ndarray,
             num_frames: np.ndarray) -> None:
        L = lengths[idx]
        width = int(L.max()) if len(idx) else 0
        x = np.zeros((len(idx), width), dtype=np.float32)
        for j, i in enumerate(idx):
            x[j, : L[j]] = wavs[i]
        out = self.teacher(torch.from_numpy(x), torch.from_numpy(L))
        nf = out.num_frames.tolist()
        real, padded = int(L.sum()), len(idx) * width - int(L.sum())
        self.stats.segments += len(idx)
        self.stats.batches += 1
        self.stats.samples += real
        self.stats.padded_samples += padded
        self.stats.frames += sum(nf)
        if self._metrics:  # Ray counters only take positive increments
            if real:
                self._metrics[0].inc(real)
            if padded:
                self._metrics[1].inc(padded)
        if self.encode is None:
            emb = out.embeddings.cpu().numpy()
            for j, i in enumerate(idx):
                values[i] = np.ascontiguousarray(emb[j, : nf[j]].reshape(-1), dtype=np.float32)
                num_frames[i] = nf[j]
            return
        valid = out.embeddings[torch.arange(out.embeddings.shape[1], device=out.embeddings.device).unsqueeze(0)
                               < out.num_frames.to(out.embeddings.device).unsqueeze(1)]  # [sum nf, D], row order kept
        tokens = self.encode(valid) if valid.shape[0] else np.zeros((0, 0), np.uint8)
        tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if tokens.dtype != np.uint8 or tokens.ndim != 2 or tokens.shape[0] != valid.shape[0]:
            raise TypeError(f"encode must return uint8 tokens [{valid.shape[0]}, C], got {tokens.dtype} {tokens.shape}")
        offsets = np.concatenate([[0], np.cumsum(nf)])
        for j, i in enumerate(idx):
            values[i] = np.ascontiguousarray(tokens[offsets[j]: offsets[j + 1]]).tobytes()
            num_frames[i] = nf[j]


def _ray_counters(teacher_name: str):
    """(samples, padded samples) Ray metric counters, or None outside a Ray worker."""
    try:
        import ray
        from ray.util.metrics import Counter

        if not ray.is_initialized():
            return None
        tags = {"teacher": teacher_name}
        samples = Counter("spear_teacher_samples", "audio samples run through a teacher", tag_keys=("teacher",))
        padded = Counter("spear_teacher_padded_samples", "padding samples added by teacher batching",
                         tag_keys=("teacher",))
        samples.set_default_tags(tags)
        padded.set_default_tags(tags)
        return samples, padded
    except Exception as exc:  # noqa: BLE001 - metrics are optional; the stage works without them
        log.debug("teacher metrics unavailable: %s", exc)
        return None


# ----------------------------------------------------------------------------- actor pool sizing


#: Restarts of a dead teacher actor in an embedded run before the run ends (see TeacherPoolPlan.map_batches_kwargs).
TEACHER_ACTOR_RESTARTS = 2


@dataclass(frozen=True)
class TeacherPoolPlan:
    """How many teacher actors, with which resources, the rows per Ray batch, and the torch threads of a CPU actor."""

    min_actors: int
    max_actors: int
    num_gpus: float
    num_cpus: float
    batch_size: int
    reason: str = field(default="", compare=False)
    # Ray starts an actor that reserves less than one CPU with OMP_NUM_THREADS=1; a CPU teacher
    # given 2 CPUs per actor then runs at half speed (CREPE: pass 1 took 91 s on 1 thread, 61 s on 2).
    num_threads: int | None = None
    # Host memory Ray reserves per actor (bytes; None: none, Ray's default), see teacher_actor_memory.
    memory: int | None = None

    def map_batches_kwargs(self) -> dict[str, Any]:
        """``compute``, ``num_gpus``, ``num_cpus``, ``memory``, ``batch_size`` and ``max_restarts`` for ``Dataset.map_batches``,
        and ``fn_constructor_kwargs`` with ``num_threads`` where the plan sets threads (CPU actors): merge
        it with the stage's own constructor arguments through :func:`teacher_stage_kwargs`.

        ``max_restarts``: :data:`TEACHER_ACTOR_RESTARTS`. Ray Data's default restarts a dead actor
        without end (``max_restarts=-1``, ``max_task_retries=-1``), which loops on a death that repeats
        (killed for memory, a GPU fault). With no restarts (``max_restarts=0``, this project's setting
        before) an actor that died while idle was never replaced: Ray Data keeps a dead actor in its
        fixed-size pool and waits for it forever (ray-project/ray#62746; the tokenize run hung without
        a word). So a few restarts: a one-off death is replaced and the run goes on; a death that
        repeats ends the run with its cause, and the next run resumes from the last commit. The price:
        Ray core prints "has constructor arguments in the object store and max_restarts > 0" once per
        run (Ray Data passes every pool actor its UDF as object-store references; ray-project/ray#53727).
        Ray 2.60 takes ``max_restarts`` only among ``map_batches``' extra remote args, which it marks
        deprecated for 2.64: check it there when upgrading Ray.
        """
        import ray

        kwargs: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors),
            "num_cpus": self.num_cpus,
            "batch_size": self.batch_size,
            "max_restarts": TEACHER_ACTOR_RESTARTS,
        }
        if self.num_gpus:
            kwargs["num_gpus"] = self.num_gpus
        if self.memory:
            kwargs["memory"] = self.memory
        if self.num_threads:
            kwargs["fn_constructor_kwargs"] = {"num_threads": self.num_threads}
        return kwargs


def teacher_stage_kwargs(pool_kwargs: Mapping[str, Any], **constructor: Any) -> dict[str, Any]:
    """``map_batches(TeacherStage, **...)`` kwargs: a pool's ``map_batches`` kwargs with ``constructor``
    (the stage's arguments) added to the constructor arguments the pool plan sets (its thread count).

    >>> kw = teacher_stage_kwargs({"batch_size": 16, "fn_constructor_kwargs": {"num_threads": 2}}, teacher="t")
    >>> kw["fn_constructor_kwargs"], kw["batch_size"]
    ({'num_threads': 2, 'teacher': 't'}, 16)
    """
    kwargs = dict(pool_kwargs)
    kwargs["fn_constructor_kwargs"] = {**kwargs.get("fn_constructor_kwargs", {}), **constructor}
    return kwargs


def map_teacher_stage(ds: "ray.data.Dataset", pool_kwargs: Mapping[str, Any], **constructor: Any) -> "ray.data.Dataset":
    """``ds`` mapped by a pool of :class:`TeacherStage` actors: a pool plan's ``map_batches`` kwargs
    (:meth:`TeacherPoolPlan.map_batches_kwargs`) and the stage's constructor arguments (``teacher=``, ...)."""
    with warnings.catch_warnings():
        # max_restarts reaches the actors only as an extra remote arg, which Ray 2.60 calls deprecated
        # (see TeacherPoolPlan.map_batches_kwargs): the project knows, and a user needs no line about it.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(TeacherStage, **teacher_stage_kwargs(pool_kwargs, **constructor))


def plan_teacher_pool(cfg: TeacherConfig, resources: Mapping[str, float] | None = None, actors: int | None = None,
                      expected_segment_seconds: float = 10.0, footprint: TeacherFootprint | None = None
                      ) -> TeacherPoolPlan:
    """Size the teacher actor pool from the cluster's resources (default: ``ray.cluster_resources()``).

    GPUs present: one actor per ``cfg.num_gpus`` GPUs (or per the GPU share given, when that
    is less), 1 CPU each. No GPU: about one actor per 2 CPUs, each running torch on 2 threads
    (the CPUs over the actors), the decode tasks in between. ``actors`` overrides the
    count (``tokenize.teacher_actors``). Rows per Ray batch: about eight full teacher
    sub-batches (``8 * batch_seconds / expected_segment_seconds``, at least 16): sorting
    by length inside a larger batch wastes less on padding (``bench/teacher.py``: ~15% with
    24 rows, ~8% with 64, ~3% with 256 for 60 s sub-batches), and decoded audio is small.
    Host memory per actor: ``cfg.memory_gb``, else with a ``footprint`` the estimate of
    :func:`teacher_actor_memory`, at most ``resources["memory"]`` over the actors (none without it:
    Ray's default, no reservation).
    """
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    if gpus > 0 and cfg.num_gpus > 0:
        # Less GPU than one actor asks for (two teachers sharing one GPU): the actor takes the share there is.
        num_gpus = min(cfg.num_gpus, gpus)
        n, num_cpus = max(1, int(gpus // num_gpus)), 1.0
        reason = f"{gpus:g} GPUs / {num_gpus:g} per actor"
    else:
        n, num_gpus, num_cpus = max(1, int(cpus // 2)), 0.0, 1.0
        reason = f"no GPU: {cpus:g} CPUs / 2"
    if actors:
        n, reason = max(1, int(actors)), f"{actors} actors requested"
    threads = None if num_gpus else max(1, int(cpus // n))
    rows = max(16, math.ceil(8 * cfg.batch_seconds / expected_segment_seconds))
    memory = None
    if cfg.memory_gb:
        memory = int(cfg.memory_gb * GiB)
    elif footprint is not None and resources.get("memory"):
        # at most the pool's share of the memory Ray schedules: more would leave actors unscheduled, the run stalled
        memory = min(teacher_actor_memory(cfg.kind, footprint, rows=rows, batch_seconds=cfg.batch_seconds,
                                          on_gpu=bool(num_gpus)),
                     int(float(resources["memory"]) / n))
    return TeacherPoolPlan(min_actors=1, max_actors=n, num_gpus=num_gpus, num_cpus=num_cpus, batch_size=rows,
                           reason=reason, num_threads=threads, memory=memory)


# ----------------------------------------------------------------------------- actor memory

MiB, GiB = 1 << 20, 1 << 30
#: Host memory of a teacher actor before its first batch: Python, torch, spear and a Ray worker (USS 155-280 MiB
#: without Ray in bench/teacher_memory.py, 150-200 MiB more in the demo's Ray actors), with room to spare.
ACTOR_BASE_BYTES = 512 * MiB
#: Peak CPU activation memory of one sub-batch per second of audio in it (float32), by kind, and the most it
#: reaches: CREPE cuts its frames into passes whose first block stays under 256 MiB (models/teachers/crepe.py),
#: so its peak does not grow with the sub-batch. Measured by bench/teacher_memory.py.
CPU_ACTIVATION_BYTES = {"mfcc": (1.5 * MiB, None), "fbank": (1.5 * MiB, None), "resemblyzer": (1.5 * MiB, None),
                        "crepe": (12 * MiB, 800 * MiB)}
#: The other kinds (transformers: every layer's output is kept, attention spans a segment): per second of audio,
#: this share of the weights' bytes, at least 2 MiB. A random-init WavLM Large (1.26 GB) on 4 x 30 s in one
#: 120 s sub-batch peaked at 4605 MiB USS (bench/teacher_memory.py --checkpoint), 30 MiB/s here.
CPU_ACTIVATION_PER_WEIGHT_BYTE = 1 / 40


@dataclass(frozen=True)
class TeacherFootprint:
    """What sizes a teacher actor's memory, known before the teacher is loaded: the bytes of its weight files
    (a checkpoint's, or the wheel's), its output (``frame_rate`` frames of ``dim`` floats per second) and the
    longest segment a batch holds (``decode.max_segment_seconds``)."""

    weight_bytes: int
    frame_rate: float
    dim: int
    max_segment_seconds: float = 30.0
    sample_rate: int = 16000


def teacher_actor_memory(kind: str, footprint: TeacherFootprint, *, rows: int, batch_seconds: float,
                         on_gpu: bool) -> int:
    """Host memory (bytes) to reserve for one teacher actor of ``kind`` taking Ray batches of ``rows`` segments.

    The sum of: :data:`ACTOR_BASE_BYTES`; the weights twice (the state dict and the module while it
    loads); the Ray batch twice over (its decoded audio at the longest segment, float32, and the
    embeddings it returns, with a copy each); on CPU, one sub-batch's activations
    (:data:`CPU_ACTIVATION_BYTES`; on a GPU they are in GPU memory). Ray Data warns when an actor
    uses more than 4/5 of its reservation; the estimate keeps clear of that for every kind measured
    (bench/teacher_memory.py prints measured peaks against it).

    >>> fp = TeacherFootprint(weight_bytes=17_090_379, frame_rate=50.0, dim=256)   # resemblyzer
    >>> round(teacher_actor_memory("resemblyzer", fp, rows=96, batch_seconds=120, on_gpu=False) / MiB)
    1357
    >>> large = TeacherFootprint(weight_bytes=1_261_869_120, frame_rate=50.0, dim=1024)   # WavLM Large on a GPU
    >>> round(teacher_actor_memory("wavlm", large, rows=96, batch_seconds=120, on_gpu=True) / GiB, 1)
    4.3
    """
    seconds = rows * footprint.max_segment_seconds
    batch = 2 * seconds * (footprint.sample_rate + footprint.frame_rate * footprint.dim) * 4
    activations = 0.0
    if not on_gpu:
        per_second, most = CPU_ACTIVATION_BYTES.get(
            kind, (max(2 * MiB, footprint.weight_bytes * CPU_ACTIVATION_PER_WEIGHT_BYTE), None))
        activations = per_second * batch_seconds if most is None else min(per_second * batch_seconds, most)
    return int(ACTOR_BASE_BYTES + 2 * footprint.weight_bytes + batch + activations)
