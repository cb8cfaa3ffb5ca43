"""Frozen features for probing: one extractor per model kind, run once over every clip.

Models (the ``model`` field of every probe result):

- ``student``: an exported student (:func:`spear.stages.artefacts.load_student`), every
  encoder layer (``layer`` 1..L, or the subset ``layers`` selects);
- ``random_student``: the same encoder architecture and size, randomly initialised with
  seed :data:`RANDOM_STUDENT_SEED` (what the architecture alone gives);
- ``teacher:<name>``: each teacher's embeddings (``teacher:mfcc``, ``teacher:fbank``,
  ``teacher:wavlm``, ...; ``@<layer>`` is appended when a layer is set and two teachers would
  otherwise share a name). Note that ``teacher:fbank`` is the *audio teacher* (log-mel pooled
  to 25 Hz) and differs from the floor below;
- ``tokens:<name>``: a teacher as its tokens see it (:class:`TokenTarget`): its embeddings
  quantised with the token set's MVQ codebooks and decoded back, i.e. what the student is trained
  to predict. Below ``teacher:<name>``, the codebooks lost that knowledge; far above ``student``,
  training has not reached it yet;
- ``fbank``: the raw 128-bin Kaldi log-mel fbank at 100 Hz, the floor every learned
  representation should beat.

:func:`extractor_loaders` turns a :class:`ProbedModels` choice into one loader per model
(models are loaded one at a time, so only one model's features are in memory at once);
:func:`extract` runs an :class:`Extractor` over the clips in length-sorted batches of at most
``batch_seconds`` of padded audio and keeps, per layer, the clip means (utterance tasks) and
the frames under the frame tasks' grid points (frame index ``floor(t * frame_rate)``).

Example::

    from spear.cluster.storage import Storage
    from spear.config import TeacherConfig
    from spear.evaluation.features import ProbedModels, extract, extractor_loaders

    models = ProbedModels(student_dir="runs/student/export", teachers=[TeacherConfig(kind="mfcc")])
    for name, load in extractor_loaders(models, Storage(), torch.device("cpu")):
        feats = extract(load(), clips, grids, num_items, torch.device("cpu"))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from spear.cluster.storage import Storage
from spear.config import TeacherConfig
from spear.evaluation.clips import Clip
from spear.models.frontend import KaldiFbank
from spear.models.student import StudentModel, build_encoder, config_from_dict, encoder_config
from spear.stages.artefacts import load_any_student, load_quantizer, load_student
from spear.stages.teacher_loading import load_teacher
from spear.schemas.segments import SAMPLE_RATE
from spear.stages.audio import pcm16_to_float
from spear.stages.batching import plan_subbatches

RANDOM_STUDENT_SEED = 0
FBANK_BINS = 128
FBANK_FRAME_RATE = 100.0  # Kaldi fbank: one frame every 10 ms

LayerFn = Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]
LayerChoice = Union[str, Sequence[int]]  # "all", "last" or 1-based layer numbers


@dataclass
class Extractor:
    """A loaded model as the evaluation runs it: every kept layer's frames for a padded batch."""

    name: str
    kind: str  # student | random_student | released | teacher | fbank
    frame_rate: float
    layers: list[Optional[int]]  # the layer numbers kept (1-based), [None] for single-output models
    fn: Optional[LayerFn]  # (wavs [B, S], lengths [B]) -> (every layer [B, T, D], frames [B]); None once released
    info: dict[str, Any] = field(default_factory=dict)


def select_layers(num_layers: int, layers: LayerChoice) -> list[int]:
    """The 1-based layer numbers ``layers`` names ("all", "last" or numbers in 1..``num_layers``)."""
    if layers == "all":
        return list(range(1, num_layers + 1))
    if layers == "last":
        return [num_layers]
    chosen = sorted({int(v) for v in layers})
    bad = [v for v in chosen if not 1 <= v <= num_layers]
    if bad or not chosen:
        raise ValueError(f"layers {list(layers)} out of range: the student has layers 1..{num_layers}")
    return chosen


def student_extractor(name: str, model: StudentModel, layers: LayerChoice, info: dict[str, Any],
                      kind: Optional[str] = None) -> Extractor:
    """The chosen encoder layers of a student (bf16 autocast); ``kind`` defaults to ``name``."""
    keep = select_layers(model.num_layers, layers)

    def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = model.features(wavs, lengths, autocast_dtype=torch.bfloat16)
        return [feats.layers[i - 1] for i in keep], feats.lengths.cpu()

    info = dict(info, num_layers=model.num_layers, layer_dims=model.layer_dims)
    return Extractor(name, kind or name, float(model.frame_rate), list(keep), fn, info)


def random_student(config: Mapping[str, Any], device: torch.device) -> StudentModel:
    """A randomly initialised student (seed RANDOM_STUDENT_SEED) of the encoder ``config`` describes:
    ``{"architecture", "size"[, "num_mel_bins"]}`` or a full encoder config (as an export's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_STUDENT_SEED)
        if "size" in config:
            enc_cfg = encoder_config(config.get("architecture", "zipformer2"), config["size"],
                                     int(config.get("num_mel_bins", FBANK_BINS)))
        else:
            enc_cfg = config_from_dict(config)
        encoder = build_encoder(enc_cfg)
    return StudentModel(encoder).to(device).eval()


def released_names(paths: Sequence[str]) -> list[str]:
    """``released:<file or folder name>`` per released model, ``#2``, ... when two share a name.

    >>> released_names(["s3://m/spear-base/", "/tmp/a/pretrained.pt", "/tmp/b/pretrained.pt"])
    ['released:spear-base', 'released:pretrained.pt', 'released:pretrained.pt#2']
    """
    names: list[str] = []
    for p in paths:
        base = f"released:{str(p).rstrip('/').rsplit('/', 1)[-1]}"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.append(name)
    return names


def teacher_names(teachers: Sequence[TeacherConfig]) -> list[str]:
    """``teacher:<kind>`` per teacher, with ``@<layer>`` when two share a kind, then ``#2``, ... if still equal."""
    base = [f"teacher:{t.kind}" for t in teachers]
    names = []
    for t, b in zip(teachers, base):
        name = b + (f"@{t.layer}" if t.layer is not None and base.count(b) > 1 else "")
        k, unique = 2, name
        while unique in names:
            unique, k = f"{name}#{k}", k + 1
        names.append(unique)
    return names


def teacher_extractor(name: str, cfg: TeacherConfig, storage: Storage, device: torch.device) -> Extractor:
    """A teacher's embeddings (its one configured layer)."""
    teacher = load_teacher(cfg, storage=storage, device=device)

    def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = teacher(wavs, lengths)
        return [out.embeddings], out.num_frames

    return Extractor(name, "teacher", float(teacher.frame_rate), [None], fn,
                     {"teacher_kind": cfg.kind, "layer": cfg.layer, "dim": teacher.dim, "version": teacher.version})


@dataclass(frozen=True)
class TokenTarget:
    """A teacher and the MVQ codebooks its tokens were made with (a token version's ``teachers[role]``)."""

    role: str                # speech | audio
    teacher: TeacherConfig
    codebooks: str           # the codebook artefact's URI


def token_names(targets: Sequence[TokenTarget]) -> list[str]:
    """``tokens:<kind>`` per target, named as its teacher's row (:func:`teacher_names`) so the two pair up."""
    return ["tokens:" + n.split(":", 1)[1] for n in teacher_names([t.teacher for t in targets])]


def token_target_extractor(name: str, target: TokenTarget, storage: Storage, device: torch.device) -> Extractor:
    """The teacher's embeddings encoded with the token set's codebooks and decoded back (what the student's
    loss asks it to predict, in the teacher's space)."""
    teacher = teacher_extractor(name, target.teacher, storage, device)
    quantizer = load_quantizer(target.codebooks, storage, device=device)
    if quantizer.dim != teacher.info["dim"]:
        raise ValueError(f"the {target.role} codebooks at {target.codebooks} are for {quantizer.dim}-dim frames; "
                         f"teacher {target.teacher.kind} gives {teacher.info['dim']}-dim ones")
    embed = teacher.fn
    assert embed is not None

    def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        (frames,), num_frames = embed(wavs, lengths)
        B, T, D = frames.shape
        codes = quantizer.encode(frames.reshape(B * T, D).float())
        return [quantizer.decode(codes).reshape(B, T, D)], num_frames

    meta = quantizer.metadata
    return Extractor(name, "tokens", teacher.frame_rate, [None], fn,
                     dict(teacher.info, role=target.role, codebooks=target.codebooks, codebook_version=quantizer.version,
                          num_codebooks=quantizer.num_codebooks, codebook_size=quantizer.codebook_size,
                          heldout_relative_loss=meta.get("heldout_relative_loss")))


def fbank_extractor(device: torch.device) -> Extractor:
    """The raw Kaldi log-mel fbank floor (:data:`FBANK_BINS` bins at 100 Hz)."""
    fbank = KaldiFbank(num_mel_bins=FBANK_BINS).to(device)

    def fn(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats, nf = fbank(wavs, lengths)
        return [feats], nf

    return Extractor("fbank", "fbank", FBANK_FRAME_RATE, [None], fn, {"settings": fbank.settings()})


# --------------------------------------------------------------------------- which models


@dataclass(frozen=True)
class ProbedModels:
    """Which models to probe.

    ``student_dir``: an exported student (None: no ``student`` rows). ``random_student``: True
    for the student's own architecture (needs ``student_dir``), a mapping such as
    ``{"architecture": "zipformer2", "size": "tiny"}`` to choose one, or False. ``teachers``:
    TeacherConfigs (or mappings of their fields). ``fbank_floor``: probe raw fbank too.
    ``layers``: "all", "last" or 1-based layer numbers of the students. ``released``: released
    SPEAR models (the authors' icefall ``.pt`` or transformers-style folder) or other spear
    exports, probed layer by layer beside the student as ``released:<name>``. ``other_students``:
    (label, export dir) pairs of further trained students, probed as ``student:<label>`` (the
    demo's ablation: single-teacher students beside the dual-teacher one). ``token_targets``:
    teachers with the codebooks of a token set, probed as ``tokens:<kind>`` after the teachers.
    ``combined_teachers``: with two teachers or more, also probe their embeddings side by side
    (:func:`combine_features`; one row, :func:`combined_teachers_name`) after the last teacher:
    what a student distilled from all of them could know at most, against each one alone.
    """

    student_dir: Optional[str] = None
    random_student: Union[bool, Mapping[str, Any]] = True
    teachers: Sequence[Union[TeacherConfig, Mapping[str, Any]]] = ()
    fbank_floor: bool = True
    layers: LayerChoice = "all"
    released: Sequence[str] = ()
    other_students: Sequence[tuple[str, str]] = ()
    token_targets: Sequence[TokenTarget] = ()
    combined_teachers: bool = False

    def __post_init__(self) -> None:
        if self.random_student is True and self.student_dir is None:
            raise ValueError("random_student=True needs student_dir (to copy its architecture); pass "
                             "random_student={'architecture': ..., 'size': ...} or False instead")

    def teacher_configs(self) -> list[TeacherConfig]:
        return [t if isinstance(t, TeacherConfig) else TeacherConfig.model_validate(dict(t)) for t in self.teachers]


def extractor_loaders(models: ProbedModels, storage: Storage, device: torch.device
                      ) -> list[tuple[str, Callable[[], Extractor]]]:
    """(model name, loader) in probing order: students, random student, teachers, token targets, fbank.

    Loaders are called in this order (the random student copies the trained one's encoder
    config when ``random_student`` is True, so the student loads first)."""
    loaders: list[tuple[str, Callable[[], Extractor]]] = []
    student_cfg: Optional[dict[str, Any]] = None
    student_dir, layers = models.student_dir, models.layers
    if student_dir is not None:
        def load_trained() -> Extractor:
            model = load_student(student_dir, storage=storage, device=device)
            nonlocal student_cfg
            student_cfg = dict(model.config.get("encoder", {}))
            return student_extractor("student", model, layers, {"path": str(student_dir),
                                                                "metadata": model.config.get("metadata", {})})

        loaders.append(("student", load_trained))
    if models.random_student:
        def load_random() -> Extractor:
            if isinstance(models.random_student, Mapping):
                cfg = dict(models.random_student)
            else:
                assert student_cfg is not None  # the student loads first (checked in ProbedModels)
                cfg = student_cfg
            return student_extractor("random_student", random_student(cfg, device), layers,
                                     {"seed": RANDOM_STUDENT_SEED, "encoder": cfg})

        loaders.append(("random_student", load_random))
    for label, path in models.other_students:
        def load_other(name: str = f"student:{label}", path: str = path) -> Extractor:
            model = load_student(path, storage=storage, device=device)
            return student_extractor(name, model, layers, {"path": str(path),
                                                           "metadata": model.config.get("metadata", {})},
                                     kind="student")

        loaders.append((f"student:{label}", load_other))
    for name, path in zip(released_names(models.released), models.released):
        def load_released(name: str = name, path: str = path) -> Extractor:
            model = load_any_student(path, storage=storage, device=device)
            return student_extractor(name, model, layers, {"path": str(path), "conversion": model.config.get(
                "conversion", {"layout": "spear"})}, kind="released")

        loaders.append((name, load_released))
    teachers = models.teacher_configs()
    for name, tcfg in zip(teacher_names(teachers), teachers):
        loaders.append((name, lambda name=name, tcfg=tcfg: teacher_extractor(name, tcfg, storage, device)))
    for name, target in zip(token_names(models.token_targets), models.token_targets):
        loaders.append((name, lambda name=name, target=target: token_target_extractor(name, target, storage, device)))
    if models.fbank_floor:
        loaders.append(("fbank", lambda: fbank_extractor(device)))
    return loaders


def combined_teachers_name(teacher_names: Sequence[str]) -> str:
    """The row name of teachers probed side by side.

    >>> combined_teachers_name(["teacher:resemblyzer", "teacher:crepe"])
    'teachers:resemblyzer+crepe'
    """
    return "teachers:" + "+".join(n.split(":", 1)[-1] for n in teacher_names)


# --------------------------------------------------------------------------- extraction


@dataclass
class Features:
    """One model's features over the clips, per kept layer."""

    pooled: list[np.ndarray]  # per kept layer: [num_items, D] float32 (rows of clips not run stay 0)
    frames: list[dict[int, np.ndarray]]  # per kept layer: item -> [grid points, D] float32


def combine_features(parts: Sequence[Features]) -> Features:
    """Single-layer features (teachers) side by side: pooled rows and grid frames concatenated along the
    feature axis. Every part holds the same items (rows of clips not run are 0 in each) and the same
    grid points per item, whatever its frame rate (:func:`extract` samples frames on the task grid).

    >>> a = Features([np.ones((2, 3), np.float32)], [{0: np.ones((4, 3), np.float32)}])
    >>> b = Features([np.zeros((2, 1), np.float32)], [{0: np.zeros((4, 1), np.float32)}])
    >>> c = combine_features([a, b])
    >>> c.pooled[0].shape, c.frames[0][0].shape
    ((2, 4), (4, 4))
    """
    if any(len(p.pooled) != 1 for p in parts):
        raise ValueError("combine_features takes single-layer features (teachers)")
    items = set(parts[0].frames[0])
    if any(set(p.frames[0]) != items for p in parts):
        raise ValueError("combine_features: the parts hold frames of different items")
    pooled = np.concatenate([p.pooled[0] for p in parts], axis=1)
    frames = {i: np.concatenate([p.frames[0][i] for p in parts], axis=1) for i in sorted(items)}
    return Features([pooled], [frames])


def extract(ex: Extractor, clips: Mapping[int, Clip], grids: Mapping[int, np.ndarray], num_items: int,
            device: torch.device, batch_seconds: float = 60.0,
            log: Callable[[str], None] = lambda msg: None) -> Features:
    """Run ``ex`` over every clip once: mean-pooled features per layer, plus the grid frames of
    the clips that frame tasks use (nothing else is kept: a clip's frames are dropped at once).

    Clips run shortest first in batches of at most ``batch_seconds`` of padded audio."""
    assert ex.fn is not None, f"{ex.name}: the extractor was released"
    ids = sorted(clips, key=lambda i: (len(clips[i].pcm), i))
    pooled: list[Optional[np.ndarray]] = [None] * len(ex.layers)
    frames: list[dict[int, np.ndarray]] = [{} for _ in ex.layers]
    lengths = {i: len(clips[i].pcm) for i in ids}
    # ids are already in length order (shortest first): the batches are consecutive runs of it
    cuts = plan_subbatches([lengths[i] for i in ids], int(batch_seconds * SAMPLE_RATE), order=np.arange(len(ids)))
    batches = [[ids[k] for k in b] for b in cuts]
    t0, done = time.monotonic(), 0
    for bi, batch in enumerate(batches):
        S = max(max(lengths[i] for i in batch), 1)
        wavs = torch.zeros(len(batch), S)
        for b, i in enumerate(batch):
            wavs[b, : lengths[i]] = torch.from_numpy(pcm16_to_float(clips[i].pcm))
        lens = torch.tensor([lengths[i] for i in batch], dtype=torch.long)
        with torch.inference_mode():
            outs, nf = ex.fn(wavs.to(device), lens.to(device))
        nf = nf.cpu().long()
        for li, y in enumerate(outs):
            y = y.float()
            T = y.shape[1]
            mask = (torch.arange(T, device=y.device)[None, :] < nf.to(y.device)[:, None]).unsqueeze(-1)
            sums = (y * mask).sum(1)
            means = (sums / nf.clamp_min(1).to(y.device)[:, None]).cpu().numpy().astype(np.float32)
            if pooled[li] is None:
                pooled[li] = np.zeros((num_items, y.shape[2]), np.float32)
            pooled[li][batch] = means
            for b, i in enumerate(batch):
                if i in grids:
                    n = int(nf[b])
                    if n == 0:
                        frames[li][i] = np.zeros((len(grids[i]), y.shape[2]), np.float32)
                        continue
                    idx = np.clip(np.floor(grids[i] * ex.frame_rate).astype(np.int64), 0, n - 1)
                    frames[li][i] = y[b, torch.from_numpy(idx).to(y.device)].cpu().numpy().astype(np.float32)
        done += sum(lengths[i] for i in batch)
        if bi == len(batches) - 1 or (bi + 1) % max(1, len(batches) // 4) == 0:
            el = time.monotonic() - t0
            log(f"[evaluate] {ex.name}: {done / SAMPLE_RATE / 60:.1f} min of audio in {el:.1f} s "
                f"({done / SAMPLE_RATE / max(el, 1e-9):.0f}x real time)")
    return Features([p if p is not None else np.zeros((num_items, 1), np.float32) for p in pooled], frames)
