"""Typed, validated configuration for every SPEAR job.

A config is one YAML file whose top-level sections map onto :class:`SpearConfig`.
Every section has defaults, so an empty file (or no file) is a valid config for the
embedded demo; ``--set section.key=value`` overrides any field after the file is read.

Example::

    >>> from spear.config import load_config
    >>> cfg = load_config(None, overrides=["decode.max_segment_seconds=10"])
    >>> cfg.decode.max_segment_seconds
    10.0

Validation happens at load time; a bad file raises :class:`ConfigError` whose
message names the file, the dotted field path and what was expected.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator


Domain = Literal["speech", "audio"]

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is meant for the user as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- reading values


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers: ``workers: 2:4`` reads as the text
    '2:4' (a worker range), not as the integer 124."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# PyYAML's own int and float patterns, less their sexagesimal alternatives ([1-9][0-9_]*(:[0-5]?[0-9])+).
ConfigLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Config YAML (a file or a ``--set`` value) as plain data, read with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)


WORKERS_EXPECTED = "a number of workers N (such as 3) or MIN:MAX for an elastic run (such as 2:4 or [2, 4])"


def parse_workers(value: Any) -> tuple[int, int]:
    """Ray Train workers in any accepted form: 3, '3', '2:4', '[2, 4]', [2, 4] or (2, 4) -> (min, max).

    Raises ValueError (worded for the user) for anything else.
    """
    v = value
    if isinstance(v, str):
        text = v.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1].strip()  # a quoted "2:4" from a command line
        if text[:1] in "[(" and text:
            try:
                v = load_yaml("[" + text[1:-1] + "]")
            except yaml.YAMLError:
                v = None
        else:
            parts = [p.strip() for p in text.split(":")]
            v = [int(p) for p in parts] if len(parts) in (1, 2) and all(p.isdigit() for p in parts) else None
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return int(v[0]), int(v[-1])
    raise ValueError(f"expected {WORKERS_EXPECTED}")


def elastic_workers(value: Any) -> tuple[int, int]:
    """``(min, max)`` Ray Train workers from any form :func:`parse_workers` accepts, with 1 <= min <= max."""
    lo, hi = parse_workers(value)
    if lo < 1 or hi < lo:
        raise ValueError("expected MIN:MAX with 1 <= MIN <= MAX, such as 2:4")
    return lo, hi


#: A ``workers`` setting (pre-training and post-training): N or MIN:MAX, validated as :func:`elastic_workers`.
Workers = Annotated[tuple[int, int], BeforeValidator(elastic_workers)]


# --------------------------------------------------------------------------- storage / ray


class StorageConfig(_Section):
    """Object-storage access. Unset fields fall back to the standard AWS variables/profile."""

    endpoint_url: Optional[str] = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (AWS_ENDPOINT_URL)")
    region: Optional[str] = Field(None, description="S3 region (AWS_REGION / AWS_DEFAULT_REGION)")
    profile: Optional[str] = Field(None, description="AWS profile name (AWS_PROFILE)")
    access_key_id: Optional[SecretStr] = Field(None, description="prefer AWS_ACCESS_KEY_ID in the environment")
    secret_access_key: Optional[SecretStr] = Field(None, description="prefer AWS_SECRET_ACCESS_KEY in the environment")
    session_token: Optional[SecretStr] = Field(None, description="temporary credentials only; prefer AWS_SESSION_TOKEN in the environment")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")
    retries: int = Field(5, ge=0, description="attempts for throttled or failed calls to a storage that has answered before (one that never answered is an error at once)")
    connect_timeout_s: float = Field(5.0, gt=0, description="seconds before an unreachable endpoint is an error")


class RayConfig(_Section):
    """Where jobs run: an embedded local Ray (address unset) or an existing cluster."""

    address: Optional[str] = Field(None, description="ray://, host:port or 'auto'; unset = embedded local Ray (RAY_ADDRESS also works)")
    num_cpus: Optional[int] = Field(None, ge=1, description="embedded Ray only: CPUs to use (default: all)")
    num_gpus: Optional[int] = Field(None, ge=0, description="embedded Ray only: GPUs to use (default: all visible)")
    object_store_memory_mb: Optional[int] = Field(None, ge=64, description="embedded Ray only: plasma store size")
    temp_dir: Optional[str] = Field(None, description="embedded Ray only: private temp dir (default: a fresh one)")
    dashboard_port: Optional[int] = Field(None, ge=1024, le=65535, description="embedded Ray only: dashboard port (default: a free one)")


# --------------------------------------------------------------------------- corpus / decode


SourceFormat = Literal["auto", "files", "lhotse-cuts", "lhotse-shar"]


class SourceConfig(_Section):
    """One corpus source (local path, file:// or s3://) whose audio shares a domain: a prefix of audio
    files, a Lhotse CutSet manifest (``cuts.jsonl.gz``, ``.jsonl``, ``.json``, ``.yaml``) or a Lhotse Shar
    directory, one segment per cut (``spear.stages.lhotse_source``)."""

    uri: str = Field(..., description="prefix to list recursively, or a Lhotse manifest / Shar directory")
    domain: Domain = Field(..., description="speech | audio: which teachers' targets the source gets")
    name: Optional[str] = Field(None, description="stable source name used in segment ids (default: last path component)")
    extensions: list[str] = Field(list(AUDIO_EXTENSIONS), description="file extensions to include")
    format: SourceFormat = Field("auto", description="files | lhotse-cuts | lhotse-shar; auto: a manifest file name "
                                                     "(.jsonl/.json/.yaml, optionally .gz) is lhotse-cuts, a folder "
                                                     "with cuts.000000.jsonl[.gz] lhotse-shar, else files")

    @model_validator(mode="after")
    def _manifest_name(self) -> "SourceConfig":
        if self.format == "lhotse-cuts" and not any(
                s in (".jsonl", ".json", ".yaml") for s in re.findall(r"\.[^./]+", self.uri.rstrip("/").rsplit("/", 1)[-1])):
            raise ValueError(f"format: lhotse-cuts needs uri to name a manifest file Lhotse reads (.jsonl, .jsonl.gz, "
                             f".json, .yaml), got {self.uri!r}")
        return self

    @field_validator("uri")
    @classmethod
    def _uri_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return v.strip()

    @field_validator("extensions")
    @classmethod
    def _normalise_ext(cls, v: list[str]) -> list[str]:
        out = [e.lower().lstrip(".") for e in v]
        if not out:
            raise ValueError("must list at least one extension")
        return out

    @property
    def source_name(self) -> str:
        if self.name:
            return self.name
        tail = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return tail or "source"


class CorpusConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="corpus sources; each a {uri, domain} mapping")

    @model_validator(mode="after")
    def _unique_names(self) -> "CorpusConfig":
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes} (set `name` on the sources)")
        return self


class DecodeConfig(_Section):
    sample_rate: int = Field(16000, description="output sample rate (the teachers and the student expect 16 kHz)")
    max_segment_seconds: float = Field(30.0, gt=0, le=600, description="recordings longer than this are cut into segments")
    min_segment_seconds: float = Field(0.0, ge=0, description="drop a final segment shorter than this (0 keeps every sample)")
    objects_per_task: int = Field(8, ge=1, description="objects decoded per Ray task batch")
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPU reservation of one decode task")
    flac_compression: int = Field(0, ge=0, le=8, description="FLAC level for stored segment audio (0 = fastest)")
    segments_per_file: int = Field(512, ge=1, description="segments per output Parquet file of `spear decode`")

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, v: int) -> int:
        if v not in (8000, 16000, 22050, 24000, 32000, 44100, 48000):
            raise ValueError("must be a standard audio rate (16000 for the teachers)")
        return v

    @model_validator(mode="after")
    def _min_below_max(self) -> "DecodeConfig":
        if self.min_segment_seconds >= self.max_segment_seconds:
            raise ValueError("min_segment_seconds must be below max_segment_seconds")
        return self


# --------------------------------------------------------------------------- teachers / mvq / tokenize


TeacherKind = Literal["mfcc", "fbank", "wavlm", "hubert", "dasheng", "resemblyzer", "crepe", "student", "spear"]

# Teacher kinds whose embeddings MVQ takes as they are by default: the authors fit Dasheng's codebooks
# without normalisation and WavLM's with it (marcoyang1998/icefall egs/general_audio_encoder/mtl/run/
# collect_embeddings/train_and_collect_{dasheng,wavlm}_cb_index*.sh: --normalize 1 for WavLM only).
UNNORMALIZED_KINDS = ("dasheng",)


class TeacherConfig(_Section):
    kind: TeacherKind = Field(..., description="mfcc | fbank (no weights) | wavlm | hubert | dasheng | resemblyzer "
                              "(GE2E speaker encoder, 50 Hz) | crepe (CREPE pitch network, 25 Hz) | student | "
                              "spear (a released SPEAR model: the authors' icefall .pt or transformers-style folder)")
    path: Optional[str] = Field(None, description="checkpoint directory or file (local or s3://); not used by mfcc/fbank; "
                                "resemblyzer / crepe default to the weights inside their installed wheels "
                                "(scripts/teacher-weights.txt; crepe: tiny.pth, set full.pth's path for the full model)")
    layer: Optional[int] = Field(None, description="layer whose output is the embedding (default: the teacher's SPEAR layer)")
    batch_seconds: float = Field(120.0, gt=0, description="audio seconds per teacher batch (duration batching)")
    num_gpus: float = Field(1.0, ge=0, le=8, description="GPUs per teacher actor when GPUs are present")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="autocast dtype on GPU; CPU runs float32")
    memory_gb: Optional[float] = Field(None, gt=0, description="host memory (GiB) Ray reserves for each teacher actor; "
                                       "unset: estimated from the checkpoint's size, the batch and the teacher's output "
                                       "(stages/teacher.py teacher_actor_memory) and kept within the pool's share of the "
                                       "cluster's memory")
    normalize: Optional[bool] = Field(None, description="per-dimension mean/std normalisation of the embeddings before "
                                      "MVQ (statistics from the fitting sample); unset: the authors' default, on for "
                                      "every kind but dasheng (WavLM features normalised, Dasheng's not). Codebooks "
                                      "fitted either way are different codebooks (and token versions)")

    @property
    def normalize_features(self) -> bool:
        """Whether MVQ normalises this teacher's embeddings: ``normalize``, else the kind's default.

        >>> TeacherConfig(kind="mfcc").normalize_features, TeacherConfig(kind="dasheng", path="d").normalize_features
        (True, False)
        """
        return self.normalize if self.normalize is not None else self.kind not in UNNORMALIZED_KINDS

    @model_validator(mode="after")
    def _needs_path(self) -> "TeacherConfig":
        if self.kind in ("wavlm", "hubert", "dasheng", "student", "spear") and not self.path:
            raise ValueError(f"teacher kind '{self.kind}' needs `path` (checkpoint location)")
        return self


class TeachersConfig(_Section):
    speech: TeacherConfig = Field(TeacherConfig(kind="mfcc"), description="teacher for all data (SPEAR: WavLM Large layer 21)")
    audio: Optional[TeacherConfig] = Field(TeacherConfig(kind="fbank"), description="teacher for audio-domain data (SPEAR: Dasheng); null disables")

    def configured(self) -> list[TeacherConfig]:
        """The teachers that are set, speech first (the order evaluation rows and provenance use)."""
        return [t for t in (self.speech, self.audio) if t is not None]


class MVQConfig(_Section):
    speech_codebooks: int = Field(16, ge=1, le=64, description="codebooks (bytes per frame) for the speech teacher")
    audio_codebooks: int = Field(8, ge=1, le=64, description="codebooks for the audio teacher")
    codebook_size: int = Field(256, description="entries per codebook (tokens are uint8)")
    sample_frames: int = Field(200_000, ge=1000, description="teacher frames sampled (reservoir) to fit the codebooks")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="sample share kept out of fitting to measure reconstruction loss")
    refine_iters: int = Field(4, ge=0, description="joint refinement passes at most after the k-means initialisation (0: initialisation only); a pass is kept only when the validation loss falls")
    kmeans_points_per_centroid: int = Field(256, ge=16, description="frames (residuals) per codebook entry each k-means of the initialisation trains on at most (faiss' max_points_per_centroid); the fit's time grows with it")
    kmeans_dim_steps: int = Field(10, ge=0, description="steps of the initialisation's progressive-dimension k-means (faiss ProgressiveDimClustering: PCA dims grow over this many steps of 10 iterations; 0: plain k-means)")
    seed: int = Field(0, description="seed of sampling and fitting")
    min_frames_per_entry: int = Field(4, ge=1, description="fewest sampled frames per codebook entry to fit at all (below 40 the fit is poor and a warning says so)")
    reuse_codebooks: Optional[str] = Field(None, description="token dataset or codebook folder whose codebooks for the same teacher version and shape are used instead of fitting new ones")

    @field_validator("codebook_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 2 or v > 256 or v & (v - 1):
            raise ValueError("must be a power of two between 2 and 256 (tokens are stored as uint8)")
        return v


class TokenizeConfig(_Section):
    shard_target_mb: float = Field(256.0, gt=0, description="target size of one Parquet token shard")
    teacher_actors: Optional[int] = Field(None, ge=1, description="teacher actor pool size (default: from the GPUs/CPUs present)")
    commit_interval_s: float = Field(60.0, gt=0, description="commit finished objects at least this often (a crash loses at most this much work)")
    flac_bytes_per_second: float = Field(20000.0, gt=0, description="expected FLAC bytes per audio second, to size shards")


# --------------------------------------------------------------------------- train / evaluate


class StudentConfig(_Section):
    architecture: Literal["zipformer2", "transformer"] = Field("zipformer2", description="student encoder")
    size: Literal["tiny", "mini", "small", "base", "spear-base", "spear-large", "spear-600m"] = Field(
        "tiny", description="preset size; spear-base / spear-large / spear-600m are the authors' published "
                            "models (93M, 327M, 600M: docs/recipe.md), base the older 86M preset")
    num_mel_bins: int = Field(128, ge=40, description="fbank bins of the student input")
    frame_rate: Literal[50, 25] = Field(50, description="student output frames per second: 50, or 25 as the "
                                        "authors' unified runs (Zipformer2 output downsampling 2; WavLM's 50 Hz "
                                        "tokens are then predicted two frames per student frame)")
    whitening_limit: float = Field(0.0, ge=0, description="icefall's Whiten on every Zipformer2 layer's output and the front end's: a "
                                   "gradient that keeps frames from collapsing onto a few directions, applied "
                                   "when D / participation ratio of the batch's frames exceeds this; 0 is off "
                                   "(icefall: 4)")
    whitening_grad_scale: float = Field(0.01, gt=0, le=1, description="the Whiten gradient's size relative to "
                                        "the training gradient (icefall: 0.01)")
    whitening_prob: float = Field(0.25, gt=0, le=1, description="share of training steps the Whiten check "
                                  "runs on (icefall: 0.025-0.25)")

    @model_validator(mode="after")
    def _whitening_architecture(self) -> "StudentConfig":
        if self.whitening_limit and self.architecture != "zipformer2":
            raise ValueError("whitening_limit applies to the zipformer2 student only (set it to 0)")
        return self


class MaskingConfig(_Section):
    mask_prob: float = Field(0.65, ge=0, le=1, description="wav2vec2/fairseq mask_prob: spans start with probability mask_prob / mask_length (about 49% of frames masked at the defaults)")
    mask_length: int = Field(10, ge=1, description="span length in fbank frames")
    min_masks: int = Field(2, ge=0, description="minimum spans per utterance")
    channel_mask_prob: float = Field(0.25, ge=0, le=1)
    channel_mask_length: int = Field(20, ge=1)


class MixingConfig(_Section):
    prob: float = Field(0.4, ge=0, le=1, description="probability an utterance gets another mixed in")
    min_region: float = Field(0.2, ge=0, le=1, description="mixed region, share of the reference (min)")
    max_region: float = Field(0.5, ge=0, le=1, description="mixed region, share of the reference (max)")
    speech_snr_db: tuple[float, float] = Field((-5.0, 5.0), description="SNR range when the mixed-in utterance is speech")
    noise_snr_db: tuple[float, float] = Field((5.0, 20.0), description="SNR range when it is audio")

    @model_validator(mode="after")
    def _ranges(self) -> "MixingConfig":
        if self.min_region > self.max_region:
            raise ValueError("min_region must not exceed max_region")
        for name in ("speech_snr_db", "noise_snr_db"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high")
        return self


class ScaledAdamConfig(_Section):
    """ScaledAdam with the Eden schedule (:mod:`spear.models.optim`): the optimiser Zipformer2 was designed
    around and SPEAR trains with. Eden's warm-up runs over ``train.warmup_steps``."""

    base_lr: float = Field(0.045, gt=0, description="Eden's base learning rate (the SPEAR runs: 0.045); "
                           "not scaled with the world size")
    lr_batches: float = Field(7500, gt=0, description="Eden: steps after which the lr falls (as steps^-0.5)")
    lr_hours: float = Field(75000, ge=0, description="Eden's epoch term counts hours of audio trained on (world size "
                            "x batch_seconds per step), falling after this many (the SPEAR runs: 75,000); 0: count "
                            "passes over the token dataset against lr_epochs instead")
    lr_epochs: float = Field(3.5, gt=0, description="Eden: passes over the token dataset after which the lr falls "
                             "(used when lr_hours is 0)")
    warmup_start: float = Field(0.5, ge=0, le=1, description="Eden's warm-up starts at this share of base_lr")
    clipping_scale: float = Field(2.0, gt=0, description="clip gradients above this multiple of the running "
                                  "median gradient norm")


class TrainConfig(_Section):
    shards: Optional[str] = Field(None, description="token dataset to train on: the `output` of `spear tokenize` (--shards)")
    token_version: Optional[str] = Field(None, description="token version to use when the dataset holds several")
    student: StudentConfig = StudentConfig()
    masking: MaskingConfig = MaskingConfig()
    mixing: MixingConfig = MixingConfig()
    audio_loss_weight: float = Field(0.1, ge=0, description="lambda of the audio-teacher loss (the authors' unified "
                                     "runs: 0.1 at every size; 0.25 before issue 13)")
    teacher_roles: list[Literal["speech", "audio"]] = Field(
        ["speech", "audio"], min_length=1,
        description="teacher roles the student learns from (both: SPEAR's dual-teacher student; one of them: a "
                    "single-teacher student on the same shards, as `spear demo --ablation` trains)")
    audio_weight: float = Field(3.0, gt=0, description="audio stream weight relative to speech (by duration)")
    batch_seconds: float = Field(60.0, gt=0, description="audio seconds per worker batch")
    optimizer: Optional[Literal["scaled_adam", "adamw"]] = Field(
        None, description="scaled_adam (ScaledAdam + Eden: train.scaled_adam) or adamw (AdamW + cosine decay: "
                          "train.lr); unset: scaled_adam for a zipformer2 student, as the authors, adamw for the "
                          "transformer")
    scaled_adam: ScaledAdamConfig = ScaledAdamConfig()
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW (train.optimizer=adamw); "
                      "ScaledAdam's is train.scaled_adam.base_lr")
    warmup_steps: int = Field(500, ge=0)
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    workers: Workers = Field((1, 1), description="elastic (min, max) Ray Train workers")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPU reservation per worker (fractional leaves room for data loading)")
    max_failures: int = Field(3, ge=0, description="worker failures (and elastic shrinks) retried from the latest checkpoint")
    elastic_monitor_s: float = Field(60.0, ge=0, description="how often Ray Train considers growing the worker group")
    collective_timeout_s: float = Field(600.0, gt=0, description="seconds a worker waits for the others (a step, "
                                        "a checkpoint) before the run ends with an error naming it")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="compute dtype of the student's forward pass on CUDA workers (bf16: torch.autocast, "
        "as the authors train in half precision; fp32: none); CPU workers always compute in float32")
    seed: int = 0
    init_from: Optional[str] = Field(
        None, description="initialise the student encoder from a released SPEAR model (the authors' icefall .pt "
                          "or transformers-style folder) or a `spear export` folder, local or s3://; its "
                          "architecture must equal train.student's; heads start fresh; a resumed run ignores it")

    @property
    def optimizer_kind(self) -> Literal["scaled_adam", "adamw"]:
        """``optimizer``, or when unset the student's default: ScaledAdam for Zipformer2, AdamW otherwise.

        >>> TrainConfig().optimizer_kind, TrainConfig(student={"architecture": "transformer"}).optimizer_kind
        ('scaled_adam', 'adamw')
        """
        if self.optimizer is not None:
            return self.optimizer
        return "scaled_adam" if self.student.architecture == "zipformer2" else "adamw"


class EvaluateConfig(_Section):
    seeds: list[int] = Field([0, 1, 2], description="probe seeds; scores carry a confidence interval over them")
    manifests: list[str] = Field(default_factory=list, description="extra labelled manifests (CSV/JSONL: uri,label[,split])")
    probe_tokens: bool = Field(False, description="also probe each teacher as its tokens render it (encoded with the "
                               "token set's codebooks and decoded back): what the student is trained to predict")
    combined_teachers: bool = Field(False, description="with two teachers or more, also probe their embeddings side by "
                                    "side (one row, teachers:<kind>+<kind>): what a student distilled from all of "
                                    "them could know at most, against each teacher alone")


# --------------------------------------------------------------------------- post-training

AttributeKind = Literal["speaker", "semantic", "counting"]
#: The synthetic counting tasks (:data:`spear.synthetic.counting.COUNTING_TASKS`; kept here as plain
#: names so that loading a config imports no signal code).
COUNTING_TASK_NAMES = ("tones", "partials", "onsets", "sweeps", "longer", "higher")


class AttributeConfig(_Section):
    """One utterance-level attribute to post-train (one head, one loss).

    ``speaker``: AAM softmax over the training speakers (the manifests' ``speaker`` field);
    ``semantic``: alignment with a sentence embedding of the manifests' ``pivot`` (else ``text``)
    field, from ``text_encoder`` when set, else the weight-free pivot embedding; ``counting``:
    SpectCount-style synthetic signals generated on the fly (``tasks``), no files.
    """

    name: str = Field(..., min_length=1, description="the attribute's name: key of its embedding and metrics")
    kind: AttributeKind = Field(..., description="speaker | semantic | counting")
    dim: int = Field(192, ge=1, description="embedding size (semantic: the target sentence embedding's size when "
                                            "the targets are weight-free; a text encoder fixes it)")
    loss_weight: float = Field(1.0, ge=0, description="weight of this attribute's loss in the total")
    sample_weight: float = Field(1.0, gt=0, description="share of batch rows drawn for this attribute, relative to "
                                                       "the others (counting: the synthetic share of every batch)")
    margin: float = Field(0.2, ge=0, le=1, description="speaker: the AAM angular margin")
    scale: float = Field(30.0, gt=0, description="speaker: the AAM logit scale")
    margin_warmup_steps: int = Field(0, ge=0, description="speaker: steps over which the margin grows from 0")
    align: Literal["cosine", "mse"] = Field("cosine", description="semantic: the alignment term")
    contrastive_weight: float = Field(1.0, ge=0, description="semantic: weight of the in-batch InfoNCE term")
    temperature: float = Field(0.05, gt=0, description="semantic: InfoNCE temperature")
    target_field: Literal["pivot", "text"] = Field(
        "pivot", description="semantic: the manifest field embedded as the target (pivot: a translation into one "
                             "pivot language, so translations of a sentence share a target; rows without it use text)")
    text_encoder: Optional[str] = Field(
        None, description="semantic: a local or s3:// folder of a transformers sentence encoder (mean pooling); "
                          "unset: the weight-free pivot embedding (feature hashing)")
    tasks: list[str] = Field(list(COUNTING_TASK_NAMES), description="counting: the synthetic tasks, any of "
                             + ", ".join(COUNTING_TASK_NAMES))
    counting_loss: Literal["classify", "regress", "both"] = Field("classify", description="counting: the loss")
    time_context: bool = Field(False, description="give the pooling each frame's relative position (order questions)")
    pool_hidden: int = Field(128, ge=1, description="attention hidden size of the pooling")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in COUNTING_TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown counting task(s) {unknown}; known: {', '.join(COUNTING_TASK_NAMES)}")
        return v


def _default_attributes() -> list[AttributeConfig]:
    return [AttributeConfig(name="speaker", kind="speaker"),
            AttributeConfig(name="semantic", kind="semantic", dim=256),
            AttributeConfig(name="counting", kind="counting", dim=64, sample_weight=0.25)]


class PostTrainConfig(_Section):
    """`spear posttrain`: one encoder post-trained into utterance-level embeddings (speaker, meaning, counting)."""

    model: Optional[str] = Field(None, description="the input model: a `spear export` folder, a training output or "
                                                   "checkpoint, or a released SPEAR model (local or s3://)")
    train_manifests: list[str] = Field(default_factory=list, description="labelled manifests to post-train on "
                                       "(CSV/JSONL: audio, speaker, language, text, pivot, ...; or Lhotse CutSets)")
    eval_manifests: list[str] = Field(default_factory=list, description="held-out manifests for `spear evaluate`: "
                                      "speakers for verification trials, sentences for cross-lingual retrieval")
    attributes: list[AttributeConfig] = Field(default_factory=_default_attributes, min_length=1,
                                              description="the attributes, each {name, kind, ...}")
    freeze: Literal["frozen", "top", "full"] = Field("top", description="frozen encoder, top N layers trainable, "
                                                                         "or full fine-tuning")
    trainable_layers: int = Field(2, ge=1, description="with freeze=top: how many top encoder layers train")
    input_layer: bool = Field(True, description="the heads also weigh the frontend's log-mel frames as layer 0")
    head_lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the heads")
    encoder_lr: float = Field(2e-4, ge=0, description="AdamW learning rate of the trainable encoder layers")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    max_steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=2, description="utterances per worker batch (labelled and synthetic together)")
    max_seconds: float = Field(6.0, gt=0, description="longer utterances are cropped at random to this length")
    checkpoint_every: int = Field(100, ge=1)
    workers: Workers = Field((1, 1), description="elastic (min, max) Ray Train workers")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPU reservation per worker")
    max_failures: int = Field(3, ge=0, description="worker failures (and elastic shrinks) retried from the latest "
                                                   "checkpoint")
    elastic_monitor_s: float = Field(60.0, ge=0, description="how often Ray Train considers growing the worker group")
    collective_timeout_s: float = Field(600.0, gt=0, description="seconds a worker waits for the others before the "
                                                                 "run ends with an error naming it")
    counting_clip_seconds: float = Field(2.0, gt=0, le=10, description="length of a synthetic counting clip")
    seed: int = 0

    @field_validator("attributes")
    @classmethod
    def _unique_names(cls, v: list[AttributeConfig]) -> list[AttributeConfig]:
        names = [a.name for a in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"attribute names must be unique; repeated: {', '.join(dup)}")
        return v


# --------------------------------------------------------------------------- the whole config


class SpearConfig(_Section):
    """The whole configuration of a SPEAR run."""

    output: str = Field("spear-output", description="where results go (local path, file:// or s3://)")
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    corpus: CorpusConfig = CorpusConfig()
    decode: DecodeConfig = DecodeConfig()
    teachers: TeachersConfig = TeachersConfig()
    mvq: MVQConfig = MVQConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    posttrain: PostTrainConfig = PostTrainConfig()
