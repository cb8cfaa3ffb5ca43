"""`spear plan`: device hours, wall time and storage of tokenising a corpus and training a student.

Every time figure comes twice, side by side, each with its source in words:

- the **FLOP bound**: FLOPs counted from the models' layer shapes, divided by an assumed
  model-FLOP utilisation (:data:`MFU`, 40 %) of the dense bf16 peak (:data:`GPU_PEAK_TFLOPS`).
  Runs are not expected to be faster than this; it leaves out loading, padding and batching.
- the **measured or pessimistic** figure: CPU work at the rates measured on this project's
  benches (a 2-core, heavily shared machine, so conservative); GPU teachers at the end-to-end
  rate icefall published for WavLM Large MVQ extraction (~50x real time per GPU; no GPU was
  available to measure this code); training at 10 % of the peak, or slower when the
  measured input pipeline (one loader per training process) cannot keep up.

Storage, checkpoint sizes and epochs are exact arithmetic on the formats.

Teachers are named by kind and size, so no checkpoint is needed: ``wavlm-large`` (layer 21 by
default), ``wavlm-base``, ``hubert-xlarge@30``, ``dasheng-base``, ``dasheng-1.2b``, ``mfcc``,
``fbank``, ``resemblyzer``, ``crepe`` / ``crepe-full`` (pretrained nets from wheels, planned on CPU at
measured rates), ``student`` (the configured student preset), ``none`` (audio only). Without a name
the config's teachers are used, their size read from the checkpoint path when it names one.

Corpus hours come from ``hours`` or, when not given, from listing ``corpus.sources``
(:func:`spear.stages.catalog.build_catalog`) and dividing each object's size by a
bytes-per-second estimate for its extension (:data:`BYTES_PER_SECOND`; a Lhotse cut by its duration). The audio-domain
share comes from the sources' ``domain`` (or ``speech_share``).

Example::

    >>> from spear.config import load_config
    >>> p = make_plan(load_config(None), hours=1000, speech_share=0.7, gpus=8, cpus=64)
    >>> round(p.figures["tokens_bytes"].rate / 1e9, 2)    # mfcc 16 x 50 Hz + fbank 8 x 25 Hz
    3.1
    >>> p = make_plan(load_config(None), hours=1000, speech_teacher="wavlm-large", audio_teacher="dasheng-1.2b")
    >>> p.teachers["speech"]["name"], round(p.teachers["speech"]["params"] / 1e6)
    ('wavlm-large@21', 315)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from spear.config import ConfigError, SpearConfig, TeacherConfig
from spear.schemas.segments import SAMPLE_RATE
from spear.stages.catalog import build_catalog

# --------------------------------------------------------------------------- the rate table

#: dense bf16 peak TFLOP/s (no sparsity). H200 = H100 compute with more, faster memory.
GPU_PEAK_TFLOPS: dict[str, float] = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0}
#: assumed model-FLOP utilisation of that peak for the FLOP bound (an assumption, not a measurement).
MFU = 0.40
#: assumed utilisation for the pessimistic training figure.
PESSIMISTIC_MFU = 0.10
#: assumed GPU memory per type (GB), for the notes only.
GPU_MEMORY_GB: dict[str, int] = {"h100": 80, "h200": 141, "a100": 80, "l40s": 48}


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str          # in words: "measured ...", "published ...", "assumed ...", "layout ..."


RATES: dict[str, Rate] = {
    "decode_rt_per_core": Rate(300.0, "x real time per CPU core (FLAC decode + resample to 16 kHz)",
                               "measured with bench/decode.py on a 2-core shared machine"),
    "mfcc_rt_per_process": Rate(151.0, "x real time per CPU process",
                                "measured with bench/teacher.py on a 2-core shared machine"),
    "fbank_rt_per_process": Rate(176.0, "x real time per CPU process",
                                 "measured with bench/teacher.py on a 2-core shared machine"),
    "resemblyzer_rt_per_process": Rate(96.0, "x real time per CPU process (2 threads)",
                                       "measured with bench/teacher.py --teachers resemblyzer on a 2-core shared machine"),
    "crepe_rt_per_process": Rate(14.7, "x real time per CPU process (2 threads), tiny at 25 Hz",
                                 "measured with bench/teacher.py --teachers crepe on a 2-core shared machine"),
    "crepe_full_rt_per_process": Rate(0.65, "x real time per CPU process (2 threads), full at 25 Hz",
                                      "measured on a 2-core shared machine (8 s utterances, best of 2)"),
    "gpu_teacher_rt_pessimistic": Rate(50.0, "x real time per GPU, WavLM Large + MVQ encode, end to end",
                                       "icefall's published WavLM Large MVQ extraction on one A100 "
                                       "(loading, batching and padding included)"),
    "train_loader_rt_per_process": Rate(300.0, "x real time per training process (shard read, FLAC decode, "
                                        "mixing, fbank, masking)",
                                        "measured with bench/train.py in one process on a 2-core shared machine"),
    "mvq_encode_passes": Rate(4.0, "distance passes per frame (1 independent choice + 3 joint refinements)",
                              "the MVQ encoder's algorithm: 2 x codebooks x 256 x dim FLOPs per pass and frame"),
    "student_frame_rate": Rate(50.0, "Hz, student output (Zipformer2 embed: 100 Hz fbank -> 50 Hz)",
                               "the student encoders' output rate (docs/design.md)"),
    "flac_bytes_per_second": Rate(20000.0, "bytes per audio second of 16 kHz mono FLAC in shards",
                                  "measured on the demo corpus shards (config tokenize.flac_bytes_per_second)"),
    "checkpoint_bytes_per_param": Rate(12.0, "bytes per parameter: fp32 weights + two AdamW moments",
                                       "the checkpoint layout of stages/train_loop.py (model.pt + optim.pt)"),
    "export_bytes_per_param": Rate(4.0, "bytes per parameter: fp32 safetensors", "the layout of `spear export`"),
}

#: Bytes per audio second by file extension, to turn listed object sizes into hours.
#: wav: 16 kHz 16-bit mono PCM (44.1 kHz stereo files are 5.5x larger: give --hours for those);
#: flac: 16 kHz mono FLAC; mp3: 128 kbit/s; ogg/opus: 32 kbit/s.
BYTES_PER_SECOND: dict[str, float] = {"wav": 32000.0, "flac": 20000.0, "mp3": 16000.0, "ogg": 4000.0, "opus": 4000.0}

# --------------------------------------------------------------------------- teacher architectures

SR = SAMPLE_RATE
#: WavLM / HuBERT conv feature encoder: 7 layers of 512 channels, 16 kHz -> 50 Hz.
_HF_CONV = ((512, 10, 5), (512, 3, 2), (512, 3, 2), (512, 3, 2), (512, 3, 2), (512, 2, 2), (512, 2, 2))
_HF_POS_KERNEL, _HF_POS_GROUPS = 128, 16
#: Dasheng: 64 mel bins x 4 frames per patch at a 160-sample hop (25 tokens/s), chunks of 252 tokens.
_DASHENG_PATCH, _DASHENG_HOP, _DASHENG_CHUNK = 64 * 4, 160 * 4, 252


@dataclass(frozen=True)
class TeacherArch:
    """Layer shapes of a published teacher, enough to count its parameters and FLOPs."""

    family: str          # wavlm | hubert | dasheng
    size: str
    dim: int
    layers: int
    ffn: int
    default_layer: int   # the layer the teacher stage uses when `layer` is unset (models/teachers)
    published: str       # the published model's name

    @property
    def frame_rate(self) -> float:
        return 25.0 if self.family == "dasheng" else 50.0


TEACHER_ARCHS: dict[str, TeacherArch] = {a.family + "-" + a.size: a for a in (
    TeacherArch("wavlm", "base", 768, 12, 3072, 12, "WavLM Base"),               # microsoft/wavlm-base
    TeacherArch("wavlm", "base-plus", 768, 12, 3072, 12, "WavLM Base+"),         # microsoft/wavlm-base-plus
    TeacherArch("wavlm", "large", 1024, 24, 4096, 21, "WavLM Large"),           # SPEAR's speech teacher, layer 21
    TeacherArch("hubert", "base", 768, 12, 3072, 12, "HuBERT Base"),            # facebook/hubert-base-ls960
    TeacherArch("hubert", "large", 1024, 24, 4096, 24, "HuBERT Large"),         # facebook/hubert-large-ll60k
    TeacherArch("hubert", "xlarge", 1280, 48, 5120, 48, "HuBERT X-Large"),      # facebook/hubert-xlarge-ll60k
    TeacherArch("dasheng", "base", 768, 12, 3072, 12, "Dasheng base"),          # dasheng_base
    TeacherArch("dasheng", "0.6b", 1280, 32, 5120, 32, "Dasheng 0.6B"),         # dasheng_06B
    TeacherArch("dasheng", "1.2b", 1536, 40, 6144, 40, "Dasheng 1.2B"),         # dasheng_12B, SPEAR's audio teacher
)}
#: size assumed when a checkpoint path does not name one (SPEAR's teachers)
DEFAULT_SIZE = {"wavlm": "large", "hubert": "large", "dasheng": "1.2b"}


def _transformer_layer_params(d: int, ffn: int) -> int:
    return 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 4 * d    # attention, FFN, two layer norms


def teacher_params(arch: TeacherArch) -> int:
    """Parameters of the whole published model, counted from its layer shapes (within 0.1 % of the real ones)."""
    d = arch.dim
    if arch.family == "dasheng":
        front = _DASHENG_PATCH * d + d + d * _DASHENG_CHUNK + d + 2           # patch embed, positions, init bn
        return front + arch.layers * _transformer_layer_params(d, arch.ffn) + 2 * d
    cin, conv = 1, 0
    for c, k, _ in _HF_CONV:
        conv += k * cin * c
        cin = c
    front = conv + 2 * cin + 2 * cin + cin * d + d                           # conv, norms, projection
    pos = _HF_POS_KERNEL * d * d // _HF_POS_GROUPS + d + _HF_POS_KERNEL      # grouped conv + weight norm
    return front + pos + 2 * d + d + arch.layers * _transformer_layer_params(d, arch.ffn)


def teacher_gflop_parts(arch: TeacherArch, layer: int, segment_seconds: float) -> dict[str, float]:
    """GFLOP per audio second up to ``layer``, in parts: front end, one transformer layer (x ``layer``).

    Counts multiply-adds of convolutions and matrix products (2 FLOPs each), with attention
    over whole segments of ``segment_seconds`` (WavLM / HuBERT) or 252-token chunks (Dasheng).
    On WavLM Base it equals torch's FlopCounterMode count of the real model.
    """
    d = arch.dim
    if arch.family == "dasheng":
        rate = SR / _DASHENG_HOP
        T = _DASHENG_CHUNK
        front = 2 * _DASHENG_PATCH * d * rate
    else:
        rate, cin, front = float(SR), 1, 0.0
        for c, k, s in _HF_CONV:
            rate /= s
            front += 2 * k * cin * c * rate
            cin = c
        T = rate * segment_seconds
        front += 2 * cin * d * rate + 2 * _HF_POS_KERNEL * d * d / _HF_POS_GROUPS * rate
    attention = rate * 4 * T * d       # scores and weighted sum over T positions
    per_layer = rate * 2 * (4 * d * d + 2 * d * arch.ffn) + attention
    return {"front_end": front / 1e9, "per_layer": per_layer / 1e9, "attention_per_layer": attention / 1e9,
            "total": (front + layer * per_layer) / 1e9}


def mvq_gflop_per_second(num_codebooks: int, dim: int, frame_rate: float) -> float:
    return RATES["mvq_encode_passes"].value * 2 * num_codebooks * 256 * max(dim, 1) * frame_rate / 1e9


# --------------------------------------------------------------------------- the student


def zipformer_rate_factor(size: str) -> float:
    """Average share of the 50 Hz frame rate the Zipformer2 layers run at, weighted by layer parameters.

    Stack i runs at 50 / downsampling_factor[i] Hz; a layer's FLOPs per second are ~2 x its
    parameters x its rate, and its parameters scale with dim^2, so the factor is
    sum(L_i d_i^2 / ds_i) / sum(L_i d_i^2). SPEAR-Large (layers 1,2,2,3,1,1,1, ds 1,2,4,8,4,2,1):
    4.625 / 11 = 0.42; the 600M (layers 1,2,3,4,1,1,1): 5 / 13 = 0.385. Attention's
    quadratic term (short at 6-50 Hz) and the 100 Hz conv embed are left out.

    >>> round(zipformer_rate_factor("spear-large"), 3)
    0.42
    """
    # torch-loading modules are imported where used: `spear plan` prints its table without loading torch
    from spear.models.student.encoder import encoder_config

    c = encoder_config("zipformer2", size)
    dims = [d * d for d in c.encoder_dim]
    w = [l * d for l, d in zip(c.num_layers, dims)]
    return sum(wi / ds for wi, ds in zip(w, c.downsampling_factor)) / sum(w)


def student_params(architecture: str, size: str, num_mel_bins: int = 128) -> int:
    """Encoder parameters, counted on this code's encoder built on the meta device (no memory, no weights)."""
    import torch

    from spear.models.student.encoder import build_encoder

    with torch.device("meta"):
        enc = build_encoder(architecture, size, num_mel_bins)
    return sum(p.numel() for p in enc.parameters())


def student_output_dim(architecture: str, size: str) -> int:
    from spear.models.student.encoder import encoder_config

    c = encoder_config(architecture, size)
    return max(c.encoder_dim) if architecture == "zipformer2" else c.dim


def student_forward_gflop_per_second(architecture: str, size: str, params: float) -> float:
    """Forward FLOPs per audio second: 2 x params x 50 Hz x rate factor (1 for the flat encoder)."""
    factor = zipformer_rate_factor(size) if architecture == "zipformer2" else 1.0
    return 2 * params * RATES["student_frame_rate"].value * factor / 1e9


# --------------------------------------------------------------------------- teachers


def _size_from_path(kind: str, path: Optional[str]) -> tuple[str, bool]:
    """(size, named): the size a checkpoint path names, else SPEAR's default for the kind."""
    name = (path or "").lower()
    if kind == "dasheng":
        for pattern, size in ((r"base", "base"), (r"0[._]?6b|600m", "0.6b"), (r"1[._]?2b", "1.2b")):
            if re.search(pattern, name):
                return size, True
    else:
        for pattern, size in ((r"xlarge", "xlarge"), (r"large", "large"), (r"base[-_+]?plus|base\+", "base-plus"),
                              (r"base", "base")):
            if re.search(pattern, name) and f"{kind}-{size}" in TEACHER_ARCHS:
                return size, True
    return DEFAULT_SIZE[kind], False


def parse_teacher(name: str) -> Optional[dict[str, Any]]:
    """``KIND[-SIZE][@LAYER]`` -> {kind, size, layer}; ``none`` -> None. Raises ConfigError in plain words."""
    text = name.strip().lower()
    if text in ("none", "null", ""):
        return None
    base, _, layer_text = text.partition("@")
    layer = None
    if layer_text:
        if not layer_text.lstrip("-").isdigit():
            raise ConfigError(f"teacher {name!r}: the part after @ must be a layer number, e.g. wavlm-large@21")
        layer = int(layer_text)
    kind, _, size = base.partition("-")
    known = sorted(TEACHER_ARCHS) + ["mfcc", "fbank", "resemblyzer", "crepe", "crepe-full", "student", "wavlm",
                                     "hubert", "dasheng", "none"]
    if kind in ("mfcc", "fbank", "resemblyzer", "crepe", "student") and not size:
        return {"kind": kind, "size": None, "layer": layer}
    if kind == "crepe" and size in ("tiny", "full"):
        return {"kind": kind, "size": size, "layer": layer}
    if kind in DEFAULT_SIZE and (not size or f"{kind}-{size}" in TEACHER_ARCHS):
        return {"kind": kind, "size": size or None, "layer": layer}
    raise ConfigError(f"unknown teacher {name!r}: name one of {', '.join(known)} (optionally @LAYER)")


def teacher_plan(spec: dict[str, Any], num_codebooks: int, student: dict[str, Any],
                 segment_seconds: float) -> dict[str, Any]:
    """Everything the plan needs about one teacher: params, FLOPs (with their parts) or CPU speed, frame rate."""
    kind, layer = spec["kind"], spec.get("layer")
    if kind in ("mfcc", "fbank"):
        rt = RATES[f"{kind}_rt_per_process"]
        rate, dim = (50.0, 39) if kind == "mfcc" else (25.0, 128)
        return {"name": kind, "kind": kind, "device": "cpu", "params": 0, "dim": dim, "frame_rate": rate,
                "rt_per_process": rt.value, "size_source": "no weights", "source": rt.source}
    if kind in ("resemblyzer", "crepe"):  # small pretrained nets from wheels: planned on CPU at measured rates
        full = kind == "crepe" and (spec.get("size") == "full" or "full" in (spec.get("path") or "").lower())
        rt = RATES["crepe_full_rt_per_process" if full else f"{kind}_rt_per_process"]
        # (params, frame rate, dim at the default layer); crepe's dim is block 6's: 4 positions x its channels
        params, rate, dim = {"resemblyzer": (1.42e6, 50.0, 256), "crepe": (0.49e6, 25.0, 256)}[kind] if not full \
            else (22.2e6, 25.0, 2048)
        return {"name": "crepe-full" if full else kind, "kind": kind, "device": "cpu", "params": int(params),
                "dim": dim, "frame_rate": rate, "layer": layer, "rt_per_process": rt.value,
                "size_source": "crepe: full if the path or name says so, else tiny" if kind == "crepe" else "one size",
                "source": rt.source}
    if kind == "student":
        g = student_forward_gflop_per_second(student["architecture"], student["size"], student["encoder_params"])
        mvq = mvq_gflop_per_second(num_codebooks, student["output_dim"], 50.0)
        return {"name": f"student-{student['size']}", "kind": kind, "device": "gpu",
                "params": student["encoder_params"], "dim": student["output_dim"], "frame_rate": 50.0,
                "layer": layer, "gflop_per_audio_second": g, "mvq_gflop_per_audio_second": mvq,
                "size_source": "assumed: the configured student preset (the checkpoint is not read)",
                "flop_words": f"2 x {student['encoder_params'] / 1e6:.3g} M params x 50 Hz x rate factor "
                              f"{student['rate_factor']:.3g} = {g:.3g} GFLOP per audio s, MVQ encode {mvq:.3g}"}
    if kind == "spear":  # a released SPEAR model: the preset its path names (the checkpoint is not read)
        name = (spec.get("path") or "").lower()
        size = "spear-600m" if "600m" in name else "spear-large" if "large" in name else "spear-base"
        params = student_params("zipformer2", size, 128)
        g = student_forward_gflop_per_second("zipformer2", size, params)
        dim = student_output_dim("zipformer2", size)
        mvq = mvq_gflop_per_second(num_codebooks, dim, 50.0)
        return {"name": size, "kind": kind, "device": "gpu", "params": params, "dim": dim, "frame_rate": 50.0,
                "layer": layer, "gflop_per_audio_second": g, "mvq_gflop_per_audio_second": mvq,
                "size_source": f"assumed: {size}, the preset the path names (base unless it says large or 600m)",
                "flop_words": f"2 x {params / 1e6:.3g} M params x 50 Hz x rate factor "
                              f"{zipformer_rate_factor(size):.3g} = {g:.3g} GFLOP per audio s, MVQ encode {mvq:.3g}"}
    size, named = (spec["size"], True) if spec.get("size") else _size_from_path(kind, spec.get("path"))
    arch = TEACHER_ARCHS[f"{kind}-{size}"]
    layer = arch.default_layer if layer is None else (layer + arch.layers + 1 if layer < 0 else layer)
    if not 0 <= layer <= arch.layers:
        raise ConfigError(f"teacher {kind}-{size}: layer {layer} out of range: the model has {arch.layers} layers")
    parts = teacher_gflop_parts(arch, max(layer, 1), segment_seconds)
    mvq = mvq_gflop_per_second(num_codebooks, arch.dim, arch.frame_rate)
    attention = "252-token chunks" if kind == "dasheng" else f"whole {segment_seconds:g} s segments"
    words = (f"FLOPs counted from the layer shapes of {arch.published}: front end {parts['front_end']:.3g} + "
             f"{max(layer, 1)} of {arch.layers} layers x {parts['per_layer']:.3g} (attention over {attention}) "
             f"= {parts['total']:.3g} GFLOP per audio s, MVQ encode ({num_codebooks} codebooks) {mvq:.3g}")
    return {"name": f"{kind}-{size}" + (f"@{layer}" if layer != arch.layers else ""), "kind": kind, "size": size,
            "device": "gpu", "params": teacher_params(arch), "dim": arch.dim, "frame_rate": arch.frame_rate,
            "layer": layer, "layers": arch.layers, "gflop_per_audio_second": parts["total"],
            "mvq_gflop_per_audio_second": mvq,
            "size_source": "named" if spec.get("size") else ("from the checkpoint path" if named else
                                                              f"assumed {size}: the checkpoint path names no size"),
            "flop_words": words}


def _teacher_spec(choice: Optional[str], tcfg: Optional[TeacherConfig]) -> Optional[dict[str, Any]]:
    if choice is not None:
        return parse_teacher(choice)
    if tcfg is None:
        return None
    return {"kind": tcfg.kind, "size": None, "layer": tcfg.layer, "path": tcfg.path}


# --------------------------------------------------------------------------- figures and their printing


@dataclass
class Figure:
    """One planned figure: the FLOP bound and the measured / pessimistic / exact figure, each with its source."""

    label: str
    unit: str                       # "GPU h", "CPU core h", "h", "s", "bytes", "epochs", "audio h"
    bound: Optional[float]          # None where FLOPs do not set the pace (CPU work, storage)
    bound_source: str
    rate: Optional[float]           # None only where the figure is undefined (epochs of an empty corpus)
    rate_kind: str                  # "measured" | "pessimistic" | "exact"
    rate_source: str
    wall_on: Optional[tuple[int, str]] = None   # (devices, "GPUs"): device hours also shown as wall time on them

    def to_dict(self) -> dict[str, Any]:
        def side(value, source, kind=None):
            d = {"value": value, "source": source}
            if kind:
                d["kind"] = kind
            if self.wall_on and value is not None:
                d["wall_hours"] = value / self.wall_on[0]
            return d

        return {"label": self.label, "unit": self.unit, "flop_bound": side(self.bound, self.bound_source),
                "rate": side(self.rate, self.rate_source, self.rate_kind)}


def sig(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant figures (thousands separated); never a 0 that hides a small value."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    text = f"{x:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_value(value: Optional[float], unit: str) -> str:
    """A figure in its unit, scaled so it reads with 3 significant figures (h -> min -> s, B -> kB -> ... TB)."""
    if value is None:
        return "-"
    if unit == "bytes":
        for scale, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{sig(value / scale)} {name}"
        return f"{sig(value)} B"
    if unit.endswith(" h") or unit == "h":
        prefix = unit[:-1]
        if value == 0 or value >= 1:
            return f"{sig(value)} {prefix}h"
        if value * 60 >= 1:
            return f"{sig(value * 60)} {prefix}min"
        return fmt_value(value * 3600, f"{prefix}s")
    if unit.endswith("s") and unit.split()[-1] == "s":
        prefix = unit[:-1]
        if value == 0 or value >= 1:
            return f"{sig(value)} {prefix}s"
        if value >= 1e-3:
            return f"{sig(value * 1e3)} {prefix}ms"
        return f"{sig(value * 1e6)} {prefix}us"
    return f"{sig(value)} {unit}"


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _side(value: Optional[float], unit: str, wall_on: Optional[tuple[int, str]]) -> str:
    text = fmt_value(value, unit)
    if wall_on and value is not None:
        n, what = wall_on
        text += f", wall {fmt_value(value / n, 'h')} on {n:,} {what if n != 1 else what[:-1]}"
    return text


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What `spear plan` prints; ``to_dict()`` is the ``--json`` object."""

    hours: float
    speech_share: float
    hours_source: str
    cluster: dict[str, Any]
    teachers: dict[str, Any]
    student: dict[str, Any]
    figures: dict[str, Figure]
    sections: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"hours": self.hours, "speech_share": self.speech_share, "hours_source": self.hours_source,
                "cluster": self.cluster, "teachers": self.teachers, "student": self.student,
                "figures": {k: f.to_dict() for k, f in self.figures.items()}, "sections": self.sections,
                "notes": self.notes, "assumptions": self.assumptions}

    def human(self) -> str:
        c = self.cluster
        lines = [f"corpus: {sig(self.hours)} h ({self.hours_source}); speech {sig(100 * self.speech_share)}%, "
                 f"audio-domain {sig(100 * (1 - self.speech_share))}%",
                 f"cluster: {c['gpus']:,} x {c['gpu_type'].upper()} ({c['gpu_peak_tflops']:.0f} TFLOP/s bf16 peak), "
                 f"{c['cpus']:,} CPU cores"]
        for role, t in self.teachers.items():
            what = (f"{sig(t['params'] / 1e6)} M params, " if t["params"] else "no weights, ") + \
                f"{t['dim']}-d, {t['frame_rate']:g} Hz" + (f"; size {t['size_source']}" if t["params"] else "")
            lines.append(f"{role} teacher: {t['name']} on {t['device'].upper()} ({what})")
        s = self.student
        lines += [f"student: {s['architecture']} {s['size']}, {sig(s['params'] / 1e6)} M params "
                  f"({sig(s['encoder_params'] / 1e6)} M encoder + prediction heads)", "",
                  f"Each time figure twice. FLOP bound: the FLOPs alone at {MFU:.0%} of the bf16 peak (loading, "
                  f"padding and batching left out). Measured / pessimistic: what a first run should budget."]
        width = max(len(_side(f.bound, f.unit, f.wall_on)) for f in self.figures.values())
        width = max(width, max(len(_side(f.rate, f.unit, f.wall_on)) for f in self.figures.values()))
        for title, keys in self.sections.items():
            lines += ["", title]
            for key in keys:
                f = self.figures[key]
                lines.append(f"  {f.label}")
                if f.unit in ("bytes", "epochs", "audio h"):   # not a time figure: one line
                    lines.append(f"    {f.rate_kind:<12} {_side(f.rate, f.unit, f.wall_on):<{width}}  {f.rate_source}")
                    continue
                lines.append(f"    {'FLOP bound':<12} {_side(f.bound, f.unit, f.wall_on):<{width}}  {f.bound_source}")
                lines.append(f"    {f.rate_kind:<12} {_side(f.rate, f.unit, f.wall_on):<{width}}  {f.rate_source}")
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(lines)


def corpus_hours(cfg: SpearConfig, storage=None) -> tuple[float, float]:
    """(hours, speech share) estimated from the listed object sizes of ``corpus.sources``."""

    if not cfg.corpus.sources:
        raise ConfigError("no corpus.sources in the config: give --hours")
    cat = build_catalog(cfg.corpus.sources, storage)
    by_domain = {"speech": 0.0, "audio": 0.0}
    for uri, size, domain, cut_seconds in zip(cat.objects["uri"].to_pylist(), cat.objects["size"].to_pylist(),
                                              cat.objects["domain"].to_pylist(), cat.objects["cut_duration"].to_pylist()):
        if cut_seconds is not None:  # a Lhotse cut: its manifest gives the duration
            by_domain[domain] += cut_seconds / 3600
            continue
        ext = uri.rsplit(".", 1)[-1].lower()
        by_domain[domain] += size / BYTES_PER_SECOND.get(ext, BYTES_PER_SECOND["flac"]) / 3600
    total = sum(by_domain.values())
    return total, (by_domain["speech"] / total if total else 1.0)


def make_plan(cfg: SpearConfig, *, hours: Optional[float] = None, speech_share: Optional[float] = None,
              gpus: int = 1, cpus: int = 16, gpu_type: str = "h100", audio_in_shards: bool = True,
              speech_teacher: Optional[str] = None, audio_teacher: Optional[str] = None,
              storage=None) -> Plan:
    """The plan for ``cfg``'s teachers (or the named ones) and student at ``hours`` (else listed from corpus.sources)."""
    if gpu_type not in GPU_PEAK_TFLOPS:
        raise ConfigError(f"unknown --gpu-type {gpu_type!r}: one of {sorted(GPU_PEAK_TFLOPS)}")
    if gpus < 1 or cpus < 1:
        raise ConfigError("--gpus and --cpus must be at least 1")
    if hours is None:
        hours, listed_share = corpus_hours(cfg, storage)
        source = "estimated from listed object sizes"
        speech_share = listed_share if speech_share is None else speech_share
    else:
        source = "given"
        speech_share = 1.0 if speech_share is None else speech_share
    if hours < 0 or not 0 <= speech_share <= 1:
        raise ConfigError("--hours must be >= 0 and --speech-share between 0 and 1")
    audio_hours = hours * (1 - speech_share)
    peak = GPU_PEAK_TFLOPS[gpu_type] * 1e12
    flops, pess_flops = peak * MFU, peak * PESSIMISTIC_MFU
    peak_words = f"{gpu_type.upper()} bf16 peak {GPU_PEAK_TFLOPS[gpu_type]:.0f} TFLOP/s"
    gpu_wall, cpu_wall = (gpus, "GPUs"), (cpus, "CPU cores")

    # ---- the student (also needed by a `student` teacher)
    tc = cfg.train
    arch, size = tc.student.architecture, tc.student.size
    enc_params = student_params(arch, size, tc.student.num_mel_bins)
    out_dim = student_output_dim(arch, size)
    head_params = sum((out_dim + 1) * n * cfg.mvq.codebook_size
                      for n in (cfg.mvq.speech_codebooks, cfg.mvq.audio_codebooks))
    factor = zipformer_rate_factor(size) if arch == "zipformer2" else 1.0
    student = {"architecture": arch, "size": size, "encoder_params": enc_params, "head_params": head_params,
               "params": enc_params + head_params, "output_dim": out_dim, "rate_factor": factor}

    figures: dict[str, Figure] = {}
    sections: dict[str, list[str]] = {"TOKENISE": [], "STORAGE": [], "TRAIN": []}
    notes: list[str] = []

    def add(section: str, key: str, fig: Figure) -> None:
        figures[key] = fig
        sections[section].append(key)

    # ---- tokenise
    seg = cfg.decode.max_segment_seconds
    decode_cpu = hours / RATES["decode_rt_per_core"].value
    add("TOKENISE", "decode_cpu_hours", Figure(
        f"decode {sig(hours)} h to 16 kHz (CPU)", "CPU core h", None,
        "none: decoding is bound by entropy decoding and I/O, not FLOPs", decode_cpu, "measured",
        f"{RATES['decode_rt_per_core'].value:g}x real time per core, {RATES['decode_rt_per_core'].source}", cpu_wall))
    teachers: dict[str, Any] = {}
    tokens_per_role: dict[str, float] = {}
    gpu_bound = gpu_pess = 0.0
    cpu_h = decode_cpu
    ref = teacher_plan({"kind": "wavlm", "size": "large", "layer": None}, 16, student, seg)
    ref_g = ref["gflop_per_audio_second"] + ref["mvq_gflop_per_audio_second"]
    roles = [("speech", _teacher_spec(speech_teacher, cfg.teachers.speech), hours, cfg.mvq.speech_codebooks)]
    audio_spec = _teacher_spec(audio_teacher, cfg.teachers.audio if audio_teacher is None else None)
    if audio_spec is not None:
        roles.append(("audio", audio_spec, audio_hours, cfg.mvq.audio_codebooks))
    if roles[0][1] is None:
        raise ConfigError("the speech teacher runs on all data: it cannot be `none`")
    for role, spec, h, ncb in roles:
        t = teacher_plan(spec, ncb, student, seg)
        t.update(hours=h, num_codebooks=ncb)
        teachers[role] = t
        tokens_per_role[role] = t["frame_rate"] * ncb * 3600
        label = f"{role} teacher {t['name']} + MVQ encode on {sig(h)} h ({t['device'].upper()})"
        if h == 0:
            notes.append(f"the {role} teacher has no hours to process (speech share {sig(100 * speech_share)}%)")
        if t["device"] == "cpu":
            dev = h / t["rt_per_process"]
            cpu_h += dev
            add("TOKENISE", f"{role}_teacher_device_hours", Figure(
                label, "CPU core h", None, "none: a CPU teacher, measured instead", dev, "measured",
                f"{t['rt_per_process']:g}x real time per process, {t['source']}", cpu_wall))
            continue
        g = t["gflop_per_audio_second"] + t["mvq_gflop_per_audio_second"]
        bound = h * g * 1e9 / flops
        rt = RATES["gpu_teacher_rt_pessimistic"].value * min(1.0, ref_g / g)
        pess = h / rt
        t.update(rt_per_gpu_bound=flops / (g * 1e9), rt_per_gpu_pessimistic=rt)
        gpu_bound += bound
        gpu_pess += pess
        slower = "" if g <= ref_g else f", slowed by this teacher's {sig(g / ref_g)}x the FLOPs of WavLM Large layer 21"
        add("TOKENISE", f"{role}_teacher_device_hours", Figure(
            label, "GPU h", bound,
            f"{t['flop_words']}; at {MFU:.0%} of the {peak_words} = {sig(flops / (g * 1e9))}x real time per GPU",
            pess, "pessimistic",
            f"{sig(rt)}x real time per GPU: {RATES['gpu_teacher_rt_pessimistic'].source}{slower}", gpu_wall))
    if gpu_bound:
        add("TOKENISE", "tokenize_gpu_hours", Figure(
            "all GPU teachers", "GPU h", gpu_bound, "sum of the teachers' FLOP bounds", gpu_pess, "pessimistic",
            "sum of the teachers' pessimistic figures", gpu_wall))
    else:
        notes.append("tokenising needs no GPU: both teachers run on CPU")
    add("TOKENISE", "tokenize_cpu_hours", Figure(
        "all CPU work (decode + CPU teachers)", "CPU core h", None, "none: CPU work is measured", cpu_h, "measured",
        "sum of the measured CPU figures above", cpu_wall))
    add("TOKENISE", "tokenize_wall_hours", Figure(
        f"tokenise wall time on {_count(gpus, 'GPU')} + {_count(cpus, 'CPU core')}" if gpu_bound else
        f"tokenise wall time on {_count(cpus, 'CPU core')}", "h", max(gpu_bound / gpus, cpu_h / cpus) if gpu_bound else None,
        "the slower of GPU (FLOP bound) and CPU work; the two overlap" if gpu_bound else "none: no GPU work",
        max(gpu_pess / gpus, cpu_h / cpus), "pessimistic" if gpu_bound else "measured",
        "the slower of GPU (pessimistic) and CPU work; the two overlap" if gpu_bound else "CPU work / cores"))

    # ---- storage
    tok_total = 0.0
    for role, t in teachers.items():
        per_hour = tokens_per_role[role]
        b = per_hour * t["hours"]
        tok_total += b
        add("STORAGE", f"{role}_tokens_bytes", Figure(
            f"{role} tokens on {sig(t['hours'])} h", "bytes", None, "", b, "exact",
            f"{t['frame_rate']:g} frames/s x {t['num_codebooks']} codebook bytes = {fmt_value(per_hour, 'bytes')} "
            f"per audio hour"))
    add("STORAGE", "tokens_bytes", Figure("all tokens", "bytes", None, "", tok_total, "exact", "sum of the above"))
    audio_bytes = hours * 3600 * RATES["flac_bytes_per_second"].value if audio_in_shards else 0.0
    add("STORAGE", "audio_bytes", Figure(
        "FLAC audio in the shards" + ("" if audio_in_shards else " (left out: --no-audio-in-shards)"), "bytes", None, "",
        audio_bytes, "exact" if not audio_in_shards else "measured",
        "none stored" if not audio_in_shards else
        f"{fmt_value(RATES['flac_bytes_per_second'].value, 'bytes')} per audio second, "
        f"{RATES['flac_bytes_per_second'].source}"))
    figures["audio_bytes"].bound_source = "none: storage does not depend on FLOPs"
    add("STORAGE", "storage_bytes", Figure("total", "bytes", None, "", tok_total + audio_bytes, "exact",
                                           "tokens + audio"))

    # ---- train
    workers = tc.workers[1]
    g_fwd = student_forward_gflop_per_second(arch, size, enc_params) + 2 * head_params * 50.0 / 1e9
    g_train = 3 * g_fwd
    student["gflop_per_audio_second_train"] = g_train
    step_bound = tc.batch_seconds * g_train * 1e9 / flops
    step_flop_pess = tc.batch_seconds * g_train * 1e9 / pess_flops
    loader = RATES["train_loader_rt_per_process"]
    step_loader = tc.batch_seconds / loader.value
    step_pess = max(step_flop_pess, step_loader)
    pess_words = (f"the input pipeline: {sig(tc.batch_seconds)} s of audio per batch at {loader.value:g}x real time, "
                  f"{loader.source} (each training process loads its own batches); FLOPs at "
                  f"{PESSIMISTIC_MFU:.0%} of the peak would take {fmt_value(step_flop_pess, 's')}"
                  if step_loader >= step_flop_pess else
                  f"FLOPs at {PESSIMISTIC_MFU:.0%} of the {peak_words}; the input pipeline "
                  f"({loader.value:g}x real time, {loader.source}) needs {fmt_value(step_loader, 's')}")
    flop_words = (f"3 x forward FLOPs (2 x {sig(enc_params / 1e6)} M encoder params x 50 Hz x rate factor "
                  f"{factor:.3g} + prediction heads) = {sig(g_train)} GFLOP per audio s x {sig(tc.batch_seconds)} s "
                  f"per batch, at {MFU:.0%} of the {peak_words}")
    add("TRAIN", "train_step_seconds", Figure(
        f"step time per GPU ({sig(tc.batch_seconds)} s of audio per batch)", "s", step_bound, flop_words, step_pess,
        "pessimistic", pess_words))
    add("TRAIN", "train_gpu_hours", Figure(
        f"{_count(tc.max_steps, 'step')} on {_count(workers, 'GPU')}", "GPU h", tc.max_steps * step_bound * workers / 3600,
        "steps x the step time's FLOP bound x workers", tc.max_steps * step_pess * workers / 3600, "pessimistic",
        "steps x the pessimistic step time x workers", (workers, "GPUs")))
    seen = tc.max_steps * tc.batch_seconds * workers / 3600
    add("TRAIN", "train_audio_hours_seen", Figure(
        "audio seen", "audio h", None, "", seen, "exact",
        f"{_count(tc.max_steps, 'step')} x {sig(tc.batch_seconds)} s x {_count(workers, 'worker')}"))
    add("TRAIN", "train_epochs", Figure(
        "epochs of the corpus", "epochs", None, "", seen / hours if hours else None, "exact",
        "audio seen / corpus hours" if hours else "undefined: the corpus has no hours"))
    add("TRAIN", "checkpoint_bytes", Figure(
        "checkpoint", "bytes", None, "", student["params"] * RATES["checkpoint_bytes_per_param"].value, "exact",
        f"{sig(student['params'] / 1e6)} M params x {RATES['checkpoint_bytes_per_param'].unit}"))
    add("TRAIN", "export_bytes", Figure(
        "export", "bytes", None, "", enc_params * RATES["export_bytes_per_param"].value, "exact",
        f"{sig(enc_params / 1e6)} M encoder params x {RATES['export_bytes_per_param'].unit}"))
    for key in ("tokens_bytes", "storage_bytes", "train_audio_hours_seen", "train_epochs", "checkpoint_bytes",
                "export_bytes") + tuple(f"{r}_tokens_bytes" for r in teachers):
        figures[key].bound_source = "none: not a time figure"
    if step_bound < 0.01:
        notes.append(f"the training FLOP bound is {fmt_value(step_bound, 's')} per step: at this model size "
                     f"kernel launches and data loading, not FLOPs, set the pace; budget the pessimistic figure")

    return Plan(hours=hours, speech_share=speech_share, hours_source=source,
                cluster={"gpus": gpus, "cpus": cpus, "gpu_type": gpu_type, "gpu_peak_tflops": GPU_PEAK_TFLOPS[gpu_type],
                         "mfu": MFU, "pessimistic_mfu": PESSIMISTIC_MFU, "gpu_memory_gb": GPU_MEMORY_GB[gpu_type]},
                teachers=teachers, student=student, figures=figures, sections=sections, notes=notes,
                assumptions={"rates": {k: asdict(v) for k, v in RATES.items()},
                             "bytes_per_second_by_extension": BYTES_PER_SECOND,
                             "segment_seconds": seg})
