"""Typed, validated configuration for every SPEAR job.

A config is one YAML file whose top-level sections map onto :class:`SpearConfig`.
Every section has defaults, so an empty file (or no file) is a valid config for the
embedded demo; ``--set section.key=value`` overrides any field after the file is read.

Example::

    >>> from spear.pipeline.config import load_config
    >>> cfg = load_config(None, overrides=["decode.max_segment_seconds=10"])
    >>> cfg.decode.max_segment_seconds
    10.0

Validation happens at load time; a bad file raises :class:`ConfigError` whose
message names the file, the dotted field path and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

Domain = Literal["speech", "audio"]

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is meant for the user as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- storage / ray


class StorageConfig(_Section):
    """Object-storage access. Unset fields fall back to the standard AWS variables/profile."""

    endpoint_url: Optional[str] = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (AWS_ENDPOINT_URL)")
    region: Optional[str] = Field(None, description="S3 region (AWS_REGION / AWS_DEFAULT_REGION)")
    profile: Optional[str] = Field(None, description="AWS profile name (AWS_PROFILE)")
    access_key_id: Optional[SecretStr] = Field(None, description="prefer AWS_ACCESS_KEY_ID in the environment")
    secret_access_key: Optional[SecretStr] = Field(None, description="prefer AWS_SECRET_ACCESS_KEY in the environment")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")
    retries: int = Field(5, ge=0, description="attempts for throttled or failed storage calls")
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


class SourceConfig(_Section):
    """One corpus source: a prefix (local path, file:// or s3://) whose audio files share a domain."""

    uri: str = Field(..., description="prefix to list recursively")
    domain: Domain = Field(..., description="speech | audio: which teachers' targets the source gets")
    name: Optional[str] = Field(None, description="stable source name used in segment ids (default: last path component)")
    extensions: list[str] = Field(list(AUDIO_EXTENSIONS), description="file extensions to include")

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


TeacherKind = Literal["mfcc", "fbank", "wavlm", "hubert", "dasheng", "student"]


class TeacherConfig(_Section):
    kind: TeacherKind = Field(..., description="mfcc | fbank (no weights) | wavlm | hubert | dasheng | student")
    path: Optional[str] = Field(None, description="checkpoint directory or file (local or s3://); not used by mfcc/fbank")
    layer: Optional[int] = Field(None, description="layer whose output is the embedding (default: the teacher's SPEAR layer)")
    batch_seconds: float = Field(120.0, gt=0, description="audio seconds per teacher batch (duration batching)")
    num_gpus: float = Field(1.0, ge=0, le=8, description="GPUs per teacher actor when GPUs are present")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="autocast dtype on GPU; CPU runs float32")

    @model_validator(mode="after")
    def _needs_path(self) -> "TeacherConfig":
        if self.kind in ("wavlm", "hubert", "dasheng", "student") and not self.path:
            raise ValueError(f"teacher kind '{self.kind}' needs `path` (checkpoint location)")
        return self


class TeachersConfig(_Section):
    speech: TeacherConfig = Field(TeacherConfig(kind="mfcc"), description="teacher for all data (SPEAR: WavLM Large layer 21)")
    audio: Optional[TeacherConfig] = Field(TeacherConfig(kind="fbank"), description="teacher for audio-domain data (SPEAR: Dasheng); null disables")


class MVQConfig(_Section):
    speech_codebooks: int = Field(16, ge=1, le=64, description="codebooks (bytes per frame) for the speech teacher")
    audio_codebooks: int = Field(8, ge=1, le=64, description="codebooks for the audio teacher")
    codebook_size: int = Field(256, description="entries per codebook (tokens are uint8)")
    sample_frames: int = Field(200_000, ge=1000, description="teacher frames sampled (reservoir) to fit the codebooks")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="sample share kept out of fitting to measure reconstruction loss")
    refine_iters: int = Field(10, ge=0, description="joint refinement passes after k-means initialisation")
    seed: int = Field(0, description="seed of sampling and fitting")

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
    size: Literal["tiny", "small", "base", "spear-large", "spear-600m"] = Field("tiny", description="preset size")
    num_mel_bins: int = Field(128, ge=40, description="fbank bins of the student input")


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


class TrainConfig(_Section):
    shards: Optional[str] = Field(None, description="token dataset to train on: the `output` of `spear tokenize` (--shards)")
    token_version: Optional[str] = Field(None, description="token version to use when the dataset holds several")
    student: StudentConfig = StudentConfig()
    masking: MaskingConfig = MaskingConfig()
    mixing: MixingConfig = MixingConfig()
    audio_loss_weight: float = Field(0.25, ge=0, description="lambda of the audio-teacher loss (0.1 for 600M)")
    audio_weight: float = Field(3.0, gt=0, description="audio stream weight relative to speech (by duration)")
    batch_seconds: float = Field(60.0, gt=0, description="audio seconds per worker batch")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(500, ge=0)
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    workers: tuple[int, int] = Field((1, 1), description="elastic (min, max) Ray Train workers")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPU reservation per worker (fractional leaves room for data loading)")
    max_failures: int = Field(3, ge=0, description="worker failures (and elastic shrinks) retried from the latest checkpoint")
    elastic_monitor_s: float = Field(60.0, ge=0, description="how often Ray Train considers growing the worker group")
    seed: int = 0

    @model_validator(mode="after")
    def _workers_order(self) -> "TrainConfig":
        lo, hi = self.workers
        if lo < 1 or hi < lo:
            raise ValueError(f"workers must be (min, max) with 1 <= min <= max, got ({lo}, {hi})")
        return self


class EvaluateConfig(_Section):
    seeds: list[int] = Field([0, 1, 2], description="probe seeds; scores carry a confidence interval over them")
    manifests: list[str] = Field(default_factory=list, description="extra labelled manifests (CSV/JSONL: uri,label[,split])")


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


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `spear config init` lists every field)"
        got = e.get("input")
        got_txt = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_txt}")
    return "\n".join(lines)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {override!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: value is not valid YAML ({exc})") from None
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _merge_defaults(defaults: Any, data: Any) -> Any:
    """``data`` laid over ``defaults`` section by section, so that a partial section (a file or a
    ``--set`` giving only ``teachers.speech.batch_seconds``) keeps the section's other defaults."""
    if isinstance(defaults, dict) and isinstance(data, dict):
        merged = dict(defaults)
        for k, v in data.items():
            merged[k] = _merge_defaults(defaults[k], v) if k in defaults else v
        return merged
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SpearConfig:
    """Read ``path`` (YAML; None for all defaults), apply ``section.key=value`` overrides, validate.

    Raises :class:`ConfigError` with a message naming the file and each bad field.
    """
    source = "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        data = loaded
    for ov in overrides:
        _apply_override(data, ov)
    if overrides:
        source += " with --set " + " ".join(overrides)
    data = _merge_defaults(SpearConfig().model_dump(mode="python", exclude_none=False), data)
    try:
        return SpearConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def config_to_dict(cfg: BaseModel, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The resolved config as plain data; secrets become '***' (or are revealed if mask_secrets=False)."""
    data = cfg.model_dump(mode="python")

    def walk(model: BaseModel, node: dict[str, Any]) -> None:
        for name, value in list(node.items()):
            attr = getattr(model, name, None)
            if isinstance(attr, SecretStr):
                node[name] = "***" if mask_secrets else attr.get_secret_value()
            elif isinstance(attr, BaseModel) and isinstance(value, dict):
                walk(attr, value)
            elif isinstance(value, tuple):
                node[name] = list(value)
            elif isinstance(attr, list) and attr and isinstance(attr[0], BaseModel):
                for sub_model, sub in zip(attr, value):
                    walk(sub_model, sub)

    walk(cfg, data)
    return data


def dump_config(cfg: SpearConfig, *, mask_secrets: bool = True) -> str:
    """YAML of the resolved config (secrets masked by default)."""
    return yaml.safe_dump(config_to_dict(cfg, mask_secrets=mask_secrets), sort_keys=False)


def commented_default_config() -> str:
    """The default config as YAML with each field's description as a comment (`spear config init`)."""
    lines = [
        "# SPEAR pipeline configuration. Every field is optional; shown are the defaults.",
        "# Override any field on the command line: --set section.key=value",
    ]

    def emit(model_cls: type[BaseModel], instance: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in model_cls.model_fields.items():
            value = getattr(instance, name)
            if field.description:
                lines.append(f"{pad}# {field.description}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(type(value), value, indent + 1)
            else:
                if isinstance(value, SecretStr):
                    value = None
                plain = list(value) if isinstance(value, tuple) else value
                rendered = yaml.safe_dump({name: plain}, default_flow_style=True, width=10_000).strip()
                if rendered.startswith("{") and rendered.endswith("}"):
                    rendered = rendered[1:-1]
                lines.append(f"{pad}{rendered}")
        if model_cls is CorpusConfig:
            lines.append(f"{pad}# e.g.")
            lines.append(f"{pad}# sources:")
            lines.append(f"{pad}#   - {{uri: s3://bucket/libriheavy/, domain: speech}}")
            lines.append(f"{pad}#   - {{uri: s3://bucket/audioset/, domain: audio}}")

    emit(SpearConfig, SpearConfig(), 0)
    return "\n".join(lines) + "\n"
