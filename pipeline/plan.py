"""`spear plan`: device hours, wall time and storage of tokenising a corpus and training a student.

Everything is arithmetic on a table of per-device rates (:data:`RATES`), each with its
source: *measured* on this project's benches (CPU figures, taken on a 2-core, heavily
shared machine, so conservative) or *estimated* from FLOPs (GPU figures: no GPU was
available to measure; an assumed model-FLOP utilisation :data:`MFU` of the dense bf16
peak in :data:`GPU_PEAK_TFLOPS`).

Corpus hours come from ``hours`` or, when not given, from listing ``corpus.sources``
(:func:`spear.stages.catalog.build_catalog`) and dividing each object's size by a
bytes-per-second estimate for its extension (:data:`BYTES_PER_SECOND`). The audio-domain
share comes from the sources' ``domain`` (or ``speech_share``).

Example::

    >>> from spear.pipeline.config import load_config
    >>> p = make_plan(load_config(None), hours=1000, speech_share=0.7, gpus=8, cpus=64)
    >>> round(p.tokenize["storage"]["tokens_bytes"] / 1e9, 2)    # mfcc 16 x 50 Hz + fbank 8 x 25 Hz
    3.1
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from spear.pipeline.config import ConfigError, SpearConfig, TeacherConfig

# --------------------------------------------------------------------------- the rate table

#: dense bf16 peak TFLOP/s (no sparsity). H200 = H100 compute with more, faster memory.
GPU_PEAK_TFLOPS: dict[str, float] = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0}
#: assumed model-FLOP utilisation of that peak (an estimate, not a measurement).
MFU = 0.40
#: assumed GPU memory per type (GB), for the notes only.
GPU_MEMORY_GB: dict[str, int] = {"h100": 80, "h200": 141, "a100": 80, "l40s": 48}


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str          # "measured: <bench>" or "estimate: <how>"


RATES: dict[str, Rate] = {
    "decode_rt_per_core": Rate(300.0, "x real time per CPU core (FLAC decode + resample to 16 kHz)",
                               "measured: bench/decode.py, 2-core shared machine"),
    "mfcc_rt_per_process": Rate(151.0, "x real time per CPU process", "measured: bench/teacher.py"),
    "fbank_rt_per_process": Rate(176.0, "x real time per CPU process", "measured: bench/teacher.py"),
    "wavlm_gflop_per_s_cnn": Rate(5.7, "GFLOP per audio second, CNN front end + positional conv",
                                  "estimate: from 34.4 (layer 21) and 38.5 (24 layers) GFLOP/s"),
    "wavlm_gflop_per_s_layer": Rate(1.367, "GFLOP per audio second per transformer layer (1024-d, 50 Hz)",
                                    "estimate: (38.5 - 34.4) / 3"),
    "dasheng-base_gflop_per_s": Rate(4.5, "GFLOP per audio second", "estimate: FLOP count of the model"),
    "dasheng-0.6b_gflop_per_s": Rate(32.5, "GFLOP per audio second", "estimate: FLOP count of the model"),
    "dasheng-1.2b_gflop_per_s": Rate(58.2, "GFLOP per audio second", "estimate: FLOP count of the model"),
    "mvq_encode_passes": Rate(4.0, "distance passes per frame (1 independent choice + 3 joint refinements)",
                              "estimate: 2 x codebooks x 256 x dim FLOPs per pass and frame"),
    "student_frame_rate": Rate(50.0, "Hz, student output (Zipformer2 embed: 100 Hz fbank -> 50 Hz)",
                               "design: DESIGN.md section 1"),
    "flac_bytes_per_second": Rate(20000.0, "bytes per audio second of 16 kHz mono FLAC in shards",
                                  "measured: demo corpus shards (config tokenize.flac_bytes_per_second)"),
    "checkpoint_bytes_per_param": Rate(12.0, "bytes per parameter: fp32 weights + two AdamW moments",
                                       "layout: stages/train_loop.py model.pt + optim.pt"),
    "export_bytes_per_param": Rate(4.0, "bytes per parameter: fp32 safetensors", "layout: spear export"),
}

#: Parameters of the student presets (counted on this code's encoders, zipformer2).
STUDENT_PARAMS: dict[str, float] = {"tiny": 0.28e6, "small": 16.4e6, "base": 85.7e6,
                                    "spear-large": 326.9e6, "spear-600m": 597e6}

#: Bytes per audio second by file extension, to turn listed object sizes into hours.
#: wav: 16 kHz 16-bit mono PCM (44.1 kHz stereo files are 5.5x larger: give --hours for those);
#: flac: 16 kHz mono FLAC; mp3: 128 kbit/s; ogg/opus: 32 kbit/s.
BYTES_PER_SECOND: dict[str, float] = {"wav": 32000.0, "flac": 20000.0, "mp3": 16000.0, "ogg": 4000.0, "opus": 4000.0}


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
    from spear.models.student.encoder import encoder_config

    c = encoder_config("zipformer2", size)
    dims = [d * d for d in c.encoder_dim]
    w = [l * d for l, d in zip(c.num_layers, dims)]
    return sum(wi / ds for wi, ds in zip(w, c.downsampling_factor)) / sum(w)


def student_train_gflop_per_second(architecture: str, size: str) -> float:
    """Training FLOPs per audio second: 6 x params x 50 Hz x rate factor (1 for the flat transformer)."""
    factor = zipformer_rate_factor(size) if architecture == "zipformer2" else 1.0
    return 6 * STUDENT_PARAMS[size] * RATES["student_frame_rate"].value * factor / 1e9


# --------------------------------------------------------------------------- teachers


def _dasheng_variant(path: Optional[str]) -> str:
    name = (path or "").lower()
    if re.search(r"base", name):
        return "dasheng-base"
    if re.search(r"0[._]?6b|600m", name):
        return "dasheng-0.6b"
    return "dasheng-1.2b"   # SPEAR's audio teacher; assumed when the path does not say


def teacher_cost(tcfg: TeacherConfig, num_codebooks: int, train_arch: str, train_size: str) -> dict[str, Any]:
    """Per-audio-second cost of one teacher + its MVQ encode: device, GFLOP or CPU speed, frame rate, dim."""
    k = tcfg.kind
    if k in ("mfcc", "fbank"):
        rt = RATES[f"{k}_rt_per_process"]
        rate, dim = (50.0, 39) if k == "mfcc" else (25.0, 128)
        return {"name": k, "device": "cpu", "rt_per_process": rt.value, "frame_rate": rate, "dim": dim,
                "source": rt.source}
    if k in ("wavlm", "hubert"):
        layer = tcfg.layer or (21 if k == "wavlm" else 24)
        g = RATES["wavlm_gflop_per_s_cnn"].value + layer * RATES["wavlm_gflop_per_s_layer"].value
        name, rate, dim, src = f"{k}-large@{layer}", 50.0, 1024, RATES["wavlm_gflop_per_s_layer"].source
    elif k == "dasheng":
        name = _dasheng_variant(tcfg.path)
        g = RATES[f"{name}_gflop_per_s"].value
        rate, dim, src = 25.0, {"dasheng-base": 768, "dasheng-0.6b": 1280, "dasheng-1.2b": 1536}[name], "estimate: FLOPs"
    elif k == "student":
        # assumed the same preset as the configured student (the path's config is not read here)
        g = student_train_gflop_per_second(train_arch, train_size) / 3
        name, rate, dim, src = f"student-{train_size}", 50.0, 0, "estimate: 2 x params x rate"
    else:
        raise ConfigError(f"no rate for teacher kind {k!r}")
    mvq = RATES["mvq_encode_passes"].value * 2 * num_codebooks * 256 * max(dim, 1) * rate / 1e9
    return {"name": name, "device": "gpu", "gflop_per_s": g, "mvq_gflop_per_s": mvq, "frame_rate": rate,
            "dim": dim, "source": src}


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What `spear plan` prints; ``to_dict()`` is the ``--json`` object."""

    hours: float
    speech_share: float
    hours_source: str
    cluster: dict[str, Any]
    tokenize: dict[str, Any]
    train: dict[str, Any]
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        c, t, tr = self.cluster, self.tokenize, self.train
        lines = [f"corpus: {self.hours:,.0f} h ({self.hours_source}); speech {self.speech_share:.0%}, "
                 f"audio-domain {1 - self.speech_share:.0%}",
                 f"cluster: {c['gpus']} x {c['gpu_type'].upper()} ({c['gpu_peak_tflops']:.0f} TFLOP/s bf16 peak, "
                 f"MFU {c['mfu']:.0%} assumed), {c['cpus']} CPU cores", "",
                 "TOKENISE" + " " * 46 + "device h     wall h   source"]
        row = "  {:<50} {:>10,.1f} {:>10,.2f}   {}"
        lines.append(row.format("decode (CPU)", t["decode_cpu_hours"], t["decode_cpu_hours"] / c["cpus"],
                                RATES["decode_rt_per_core"].source))
        for role, tt in t["teachers"].items():
            unit = "GPU" if tt["device"] == "gpu" else "CPU"
            label = f"{role} teacher {tt['name']} on {tt['hours']:,.0f} h ({unit})"
            lines.append(row.format(label, tt["device_hours"], tt["wall_hours"], tt["source"]))
            if tt["device"] == "gpu":
                lines.append(row.format(f"  incl. MVQ encode ({tt['num_codebooks']} codebooks, fused)",
                                        tt["mvq_gpu_hours"], tt["mvq_gpu_hours"] / c["gpus"], "estimate: FLOPs"))
        lines.append(f"  total: {t['gpu_hours']:,.1f} GPU h + {t['cpu_hours']:,.1f} CPU core h; "
                     f"wall {t['wall_hours']:,.2f} h (GPU and CPU work overlap; the slower side sets the pace)")
        s = t["storage"]
        lines += ["", "STORAGE",
                  *[f"  tokens {r}: {v['bytes_per_audio_hour'] / 1e6:.2f} MB per audio hour x {v['hours']:,.0f} h = "
                    f"{v['bytes'] / 1e9:,.2f} GB" for r, v in s["tokens"].items()],
                  f"  FLAC audio in shards (stored: {s['audio_in_shards']}): "
                  f"{RATES['flac_bytes_per_second'].value / 1e3:.0f} kB/s = {s['audio_bytes'] / 1e12:,.3f} TB",
                  f"  total: {s['total_bytes'] / 1e12:,.3f} TB", "",
                  f"TRAIN  {tr['architecture']} {tr['size']}: {tr['params'] / 1e6:,.1f} M params, "
                  f"{tr['gflop_per_audio_second']:,.1f} GFLOP per audio second (rate factor {tr['rate_factor']:.3f})",
                  f"  {tr['max_steps']:,} steps x {tr['batch_seconds']:g} s x {tr['workers']} workers = "
                  f"{tr['audio_hours_seen']:,.0f} audio h seen ({tr['epochs']:.2f} epochs of the corpus)",
                  f"  step time per GPU {tr['step_seconds']:.3f} s; {tr['gpu_hours']:,.1f} GPU h; "
                  f"wall {tr['wall_hours']:,.2f} h on {tr['workers']} GPUs",
                  f"  checkpoint {tr['checkpoint_bytes'] / 1e9:.2f} GB (weights + AdamW), "
                  f"export {tr['export_bytes'] / 1e9:.2f} GB",
                  "", "GPU figures are FLOP-based estimates; CPU figures are measured on this project's benches."]
        return "\n".join(lines)


def corpus_hours(cfg: SpearConfig, storage=None) -> tuple[float, float]:
    """(hours, speech share) estimated from the listed object sizes of ``corpus.sources``."""
    from spear.stages.catalog import build_catalog

    if not cfg.corpus.sources:
        raise ConfigError("no corpus.sources in the config: give --hours")
    cat = build_catalog(cfg.corpus.sources, storage)
    by_domain = {"speech": 0.0, "audio": 0.0}
    for uri, size, domain in zip(cat.objects["uri"].to_pylist(), cat.objects["size"].to_pylist(),
                                 cat.objects["domain"].to_pylist()):
        ext = uri.rsplit(".", 1)[-1].lower()
        by_domain[domain] += size / BYTES_PER_SECOND.get(ext, BYTES_PER_SECOND["flac"]) / 3600
    total = sum(by_domain.values())
    return total, (by_domain["speech"] / total if total else 1.0)


def make_plan(cfg: SpearConfig, *, hours: Optional[float] = None, speech_share: Optional[float] = None,
              gpus: int = 1, cpus: int = 16, gpu_type: str = "h100", audio_in_shards: bool = True,
              storage=None) -> Plan:
    """The plan for ``cfg``'s teachers and student at ``hours`` (else listed from corpus.sources)."""
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
        raise ConfigError("--hours must be >= 0 and --speech-share in [0, 1]")
    audio_hours = hours * (1 - speech_share)
    flops = GPU_PEAK_TFLOPS[gpu_type] * 1e12 * MFU
    arch, size = cfg.train.student.architecture, cfg.train.student.size

    decode_cpu = hours / RATES["decode_rt_per_core"].value
    teachers: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    gpu_h, cpu_h = 0.0, decode_cpu
    roles = [("speech", cfg.teachers.speech, hours, cfg.mvq.speech_codebooks)]
    if cfg.teachers.audio is not None:
        roles.append(("audio", cfg.teachers.audio, audio_hours, cfg.mvq.audio_codebooks))
    for role, tcfg, h, ncb in roles:
        cost = teacher_cost(tcfg, ncb, arch, size)
        entry = {"name": cost["name"], "device": cost["device"], "hours": h, "num_codebooks": ncb,
                 "frame_rate": cost["frame_rate"], "source": cost["source"]}
        if cost["device"] == "gpu":
            total_g = cost["gflop_per_s"] + cost["mvq_gflop_per_s"]
            dev = h * 3600 * total_g * 1e9 / flops / 3600
            entry.update(gflop_per_audio_second=cost["gflop_per_s"], mvq_gflop_per_audio_second=cost["mvq_gflop_per_s"],
                         rt_per_gpu=flops / (total_g * 1e9), device_hours=dev,
                         mvq_gpu_hours=h * cost["mvq_gflop_per_s"] * 1e9 / flops, wall_hours=dev / gpus)
            gpu_h += dev
        else:
            dev = h / cost["rt_per_process"]
            entry.update(rt_per_process=cost["rt_per_process"], device_hours=dev, wall_hours=dev / cpus)
            cpu_h += dev
        teachers[role] = entry
        per_hour = cost["frame_rate"] * ncb * 3600
        tokens[role] = {"bytes_per_audio_hour": per_hour, "hours": h, "bytes": per_hour * h}
    audio_bytes = hours * 3600 * RATES["flac_bytes_per_second"].value if audio_in_shards else 0.0
    token_bytes = sum(v["bytes"] for v in tokens.values())
    tokenize = {"decode_cpu_hours": decode_cpu, "teachers": teachers, "gpu_hours": gpu_h, "cpu_hours": cpu_h,
                "wall_hours": max(gpu_h / gpus, cpu_h / cpus),
                "storage": {"tokens": tokens, "tokens_bytes": token_bytes, "audio_in_shards": audio_in_shards,
                            "audio_bytes": audio_bytes, "total_bytes": token_bytes + audio_bytes}}

    tc = cfg.train
    params = STUDENT_PARAMS[size]
    g_train = student_train_gflop_per_second(arch, size)
    workers = tc.workers[1]
    step_s = tc.batch_seconds * g_train * 1e9 / flops
    seen = tc.max_steps * tc.batch_seconds * workers / 3600
    train = {"architecture": arch, "size": size, "params": params,
             "rate_factor": zipformer_rate_factor(size) if arch == "zipformer2" else 1.0,
             "gflop_per_audio_second": g_train, "max_steps": tc.max_steps, "batch_seconds": tc.batch_seconds,
             "workers": workers, "step_seconds": step_s, "audio_hours_seen": seen,
             "epochs": seen / hours if hours else math.inf,
             "gpu_hours": tc.max_steps * step_s * workers / 3600, "wall_hours": tc.max_steps * step_s / 3600,
             "checkpoint_bytes": params * RATES["checkpoint_bytes_per_param"].value,
             "export_bytes": params * RATES["export_bytes_per_param"].value}
    return Plan(hours=hours, speech_share=speech_share, hours_source=source,
                cluster={"gpus": gpus, "cpus": cpus, "gpu_type": gpu_type, "gpu_peak_tflops": GPU_PEAK_TFLOPS[gpu_type],
                         "mfu": MFU, "gpu_memory_gb": GPU_MEMORY_GB[gpu_type]},
                tokenize=tokenize, train=train,
                assumptions={"rates": {k: asdict(v) for k, v in RATES.items()},
                             "bytes_per_second_by_extension": BYTES_PER_SECOND})
