"""A one-shot GPU check: every GPU path of the pipeline measured in one call, one JSON object out.

    python bench/gpu_check.py --out gpu_check.json          # one GPU machine (H100/H200, 16 CPUs), < 8 min
    python bench/gpu_check.py --dry-run                     # every section at tiny sizes on the CPU (CI, laptops)
    python bench/gpu_check.py --sections mvq_encode train   # some sections only

Nothing is downloaded: the teachers are random weights in the published shapes (WavLM Large
from transformers' ``WavLMConfig``, saved as a checkpoint folder the ``wavlm`` kind loads; Dasheng
1.2B saved as the ``dasheng`` kind's ``.pt``), the corpus is generated. Random weights cost
the same FLOPs as trained ones, so every speed figure holds; the codebook losses describe
random-teacher frames and only compare faiss-gpu with faiss-cpu.

Sections (each prints its figures as ``{"value", "target", "unit", "met"}``; a section that
fails or has no GPU says so and the others still run; after each section the JSON so far is
written to ``--out``, so a run cut short keeps what it measured):

- ``tokenize``: the real `spear tokenize` job (recipe ``spear-large-unified``: WavLM Large layer
  21 + Dasheng 1.2B, bf16, MVQ 16 + 8 bytes/frame) on generated speech + audio: codebooks fitted
  on a subset, then pass 2 over the whole corpus and over a quarter of it with those codebooks
  (the difference cancels the fixed cost of a run); x real time per GPU end to end and steady
  state (target 5,000x), GPU utilisation sampled with nvidia-smi, and where time goes: decode,
  teacher, MVQ and write, each measured alone on this machine as x real time (each must beat
  the job's target, or it is the bottleneck).
- ``codebooks``: MVQ codebook fitting with faiss on the GPU vs faiss on the CPU, on the same
  WavLM-Large-shaped frames: seconds and held-out relative loss.
- ``mvq_encode``: the teacher actor's encode hook (``QuantizerEncoder``, the job's own codebooks)
  on GPU frames: frames/s against 250,000 (WavLM at 50 Hz x 5,000x real time).
- ``train``: ``spear-large`` (recipe ``spear-large-unified``) training steps on the tokenize
  section's shards, DDP over nccl (world size 1), ScaledAdam, in float32 and under bf16 autocast
  (the loop's default on a GPU, train.precision): s/step, peak GPU memory, audio-seconds/s and model FLOP utilisation (FLOPs
  counted by torch's FlopCounterMode on one step).
- ``decode``: bench/decode.py's reference loop (soundfile + soxr, one process) against the Ray
  decode stage on all CPUs, on several hours of mixed-format audio (target >= 0.8 x CPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

from common import MIX, steady_state


SECTIONS = ("tokenize", "codebooks", "mvq_encode", "train", "decode")
TOKENIZE_TARGET_XRT = 5000.0  # x real time per GPU for WavLM Large (issue 13)
MVQ_TARGET_FPS = 250_000.0  # WavLM frames/s per GPU at 5,000x real time (50 Hz)
MFU_TARGET = 0.35  # model FLOP utilisation a well-fed bf16 encoder reaches on an H100
GPU_UTIL_TARGET = 0.8
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def figure(value: Any, target: Any, unit: str, better: Optional[str] = "higher", note: str = "") -> dict[str, Any]:
    """One measured figure beside its target; ``met`` compares them (None: no comparable value)."""
    met = None
    if isinstance(value, (int, float)) and isinstance(target, (int, float)) and better in ("higher", "lower") \
            and not (isinstance(value, float) and math.isnan(value)):
        met = bool(value >= target) if better == "higher" else bool(value <= target)
    out = {"value": _round(value), "target": _round(target), "unit": unit, "met": met}
    if note:
        out["note"] = note
    return out


def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.4g}")
    return v


class Context:
    """What the sections share: sizes, the device, the work folder and what earlier sections made."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.dry = bool(args.dry_run)
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = "cuda" if self.cuda else "cpu"
        self.cpus = args.cpus or (2 if self.dry else (os.cpu_count() or 1))
        self.work = args.work or tempfile.mkdtemp(prefix="spear-gpu-check-")
        self.t0 = time.monotonic()
        self.budget = args.budget_s
        self.made: dict[str, Any] = {}  # teacher checkpoints, corpus, token output, quantiser uris
        self.gpu_name = torch.cuda.get_device_name(0) if self.cuda else None

    def say(self, what: str) -> None:
        """A timeline line on stderr: a run cut short at the machine's limit still shows where its time went."""
        print(f"[gpu_check] {time.monotonic() - self.t0:6.1f} s  {what}", file=sys.stderr, flush=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def no_gpu(self) -> Optional[dict[str, Any]]:
        """The section's answer when it needs a GPU that is not there (None: go on)."""
        if self.cuda or self.dry:
            return None
        return {"skipped": "no CUDA GPU visible: this section measures a GPU path (use --dry-run for the CPU sizes)"}

    def peak_flops(self) -> Optional[float]:
        if not self.gpu_name:
            return None
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in self.gpu_name:
                return flops
        return None

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


# ----------------------------------------------------------------------------- teachers and corpus


def make_teachers(ctx: Context) -> dict[str, str]:
    """Random-weight teachers in the published shapes (tiny shapes in a dry run), saved once."""
    if "teachers" in ctx.made:
        return ctx.made["teachers"]
    import torch
    import transformers

    from spear.models.teachers import DashengConfig, DashengEncoder, save_dasheng_checkpoint

    root = os.path.join(ctx.work, "teachers")
    wavlm_dir, dasheng_pt = os.path.join(root, "wavlm-large"), os.path.join(root, "dasheng-1.2b", "dasheng.pt")
    torch.manual_seed(0)
    if ctx.dry:  # 24 layers (layer 21 exists, as in the recipe), everything else tiny
        wcfg = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=24, num_attention_heads=2,
                                        intermediate_size=64, conv_dim=(32,) * 7, num_buckets=16,
                                        max_bucket_distance=40, num_conv_pos_embeddings=16,
                                        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
        dcfg = DashengConfig(embed_dim=32, depth=3, num_heads=4)
    else:  # WavLM Large (316M) and Dasheng 1.2B (1536-d, 40 blocks, 24 heads)
        wcfg = transformers.WavLMConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096, feat_extract_norm="layer", do_stable_layer_norm=True,
                                        conv_bias=True)
        dcfg = DashengConfig(embed_dim=1536, depth=40, num_heads=24)
    transformers.WavLMModel(wcfg).save_pretrained(wavlm_dir)
    ctx.say("random WavLM teacher saved")
    os.makedirs(os.path.dirname(dasheng_pt), exist_ok=True)
    save_dasheng_checkpoint(DashengEncoder(dcfg), dasheng_pt)
    ctx.say("random Dasheng teacher saved")
    ctx.made["teachers"] = {"speech": wavlm_dir, "audio": dasheng_pt}
    return ctx.made["teachers"]


def _write_wav(job: tuple[str, float, int]) -> None:
    """One generated 16 kHz mono WAV (speech-like noise and tones); a worker of :func:`make_corpus`."""
    import soundfile as sf

    path, seconds, seed = job
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n, dtype=np.float32) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
    x = 0.1 * env * rng.standard_normal(n).astype(np.float32) + 0.1 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t)
    sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")


def make_corpus(ctx: Context) -> dict[str, Any]:
    """``hours`` of WAV, half speech-domain and half audio-domain, written by all CPUs (cached)."""
    if "corpus" in ctx.made:
        return ctx.made["corpus"]
    hours = ctx.args.hours if ctx.args.hours is not None else (3 / 60 if ctx.dry else 8.0)
    file_seconds = 20.0 if ctx.dry else 60.0
    n = max(4, int(round(hours * 3600 / file_seconds)))
    root = os.path.join(ctx.work, "corpus")
    jobs = []
    for i in range(n):
        domain = "speech" if i % 2 == 0 else "audio"
        os.makedirs(os.path.join(root, domain), exist_ok=True)
        jobs.append((os.path.join(root, domain, f"f{i:05d}.wav"), file_seconds, i))
    with multiprocessing.get_context("spawn").Pool(max(1, min(ctx.cpus, 16))) as pool:
        pool.map(_write_wav, jobs, chunksize=4)
    ctx.say(f"corpus written: {n} files, {n * file_seconds / 3600:.1f} h")
    ctx.made["corpus"] = {"root": root, "files": [j[0] for j in jobs], "seconds": n * file_seconds}
    return ctx.made["corpus"]


def _link_subset(files: list[str], folder: str) -> str:
    """A folder of links (speech/, audio/) to ``files``: a source that is part of the corpus."""
    for f in files:
        dst = os.path.join(folder, os.path.basename(os.path.dirname(f)), os.path.basename(f))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(f, dst)
    return folder


class GpuSampler:
    """GPU utilisation and memory sampled by ``nvidia-smi -lms`` while the block runs (its own child)."""

    def __init__(self, period_ms: int = 200):
        self.period_ms, self.samples, self.proc, self.reason = period_ms, [], None, None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            self.reason = "nvidia-smi not found"
            return self
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0", "-lms", str(self.period_ms)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(","))
                self.samples.append((util, mem))
            except ValueError:
                continue

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"mean_utilisation": None, "reason": self.reason or "no samples"}
        util = np.array([s[0] for s in self.samples]) / 100.0
        return {"mean_utilisation": float(util.mean()), "busy_share": float((util > 0.5).mean()),
                "max_memory_mib": float(max(s[1] for s in self.samples)), "samples": len(self.samples)}


# ----------------------------------------------------------------------------- tokenize


def tokenize_config(ctx: Context, output: str, sources_root: str, reuse: Optional[str] = None):
    from spear.config import SourceConfig, load_config

    t = make_teachers(ctx)
    sets = [f"output={output}", f"teachers.speech.path={t['speech']}", f"teachers.audio.path={t['audio']}",
            f"ray.num_cpus={ctx.cpus}", "tokenize.commit_interval_s=30"]
    if ctx.cuda:  # two teacher roles share the one GPU
        sets += ["teachers.speech.num_gpus=0.5", "teachers.audio.num_gpus=0.5", "mvq.sample_frames=60000"]
    else:
        sets += ["mvq.speech_codebooks=4", "mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.sample_frames=2000",
                 "decode.max_segment_seconds=10"]
    if reuse:
        sets.append(f"mvq.reuse_codebooks={reuse}")
    cfg = load_config("spear-large-unified", sets)
    cfg.corpus.sources = [SourceConfig(uri=os.path.join(sources_root, "speech"), domain="speech", name="speech"),
                          SourceConfig(uri=os.path.join(sources_root, "audio"), domain="audio", name="audio")]
    return cfg


def section_tokenize(ctx: Context) -> dict[str, Any]:
    if (skip := ctx.no_gpu()) is not None:
        return skip
    from spear.cluster.ray_runtime import ray_session
    from spear.pipeline.tokenize_job import run_tokenize

    t_setup = time.monotonic()
    make_teachers(ctx)
    corpus = make_corpus(ctx)
    setup_s = time.monotonic() - t_setup
    files = corpus["files"]
    work = os.path.join(ctx.work, "tokenize")
    fit_src = _link_subset(files[: max(4, len(files) // 20)], os.path.join(work, "fit-in"))
    part_src = _link_subset(files[: max(4, len(files) // 4)], os.path.join(work, "quarter-in"))
    out: dict[str, Any] = {"device": ctx.device, "gpu": ctx.gpu_name, "corpus_hours": corpus["seconds"] / 3600,
                           "setup_seconds": round(setup_s, 1)}
    cfg = tokenize_config(ctx, os.path.join(work, "fit"), fit_src)
    with ray_session(cfg.ray):
        t0 = time.monotonic()
        ctx.say("tokenize: the codebook-fitting run starts")
        fit = run_tokenize(cfg, progress=False)
        out["fit_run_seconds"] = round(time.monotonic() - t0, 1)
        ctx.say("tokenize: the codebook-fitting run ended; pass 2 over the whole corpus starts")
        full_cfg = tokenize_config(ctx, os.path.join(work, "full"), corpus["root"], reuse=cfg.output)
        with GpuSampler() as gpu:
            t0 = time.monotonic()
            full = run_tokenize(full_cfg, progress=False)
            full_wall = time.monotonic() - t0
        ctx.say(f"tokenize: pass 2 ended ({full.audio_seconds / full_wall:.0f}x real time)")
        part, part_wall = None, None
        if not ctx.dry:  # the dry run's corpus is too small to tell the steady state from the fixed cost
            part_cfg = tokenize_config(ctx, os.path.join(work, "quarter"), part_src, reuse=cfg.output)
            t0 = time.monotonic()
            part = run_tokenize(part_cfg, progress=False)
            part_wall = time.monotonic() - t0
            ctx.say("tokenize: the quarter run ended; the time split starts")
    ctx.made["tokens"] = {"output": full_cfg.output, "version": full.token_version, "cfg": full_cfg,
                          "codebooks": {r: cb.uri for r, cb in fit.codebooks.items()}}
    gpus = 1 if ctx.cuda else 0
    e2e = full.audio_seconds / full_wall
    steady, fixed, why = None, None, "dry run: the quarter run is skipped"
    if part is not None:
        steady, fixed, why = steady_state(full.audio_seconds, full_wall, part.audio_seconds, part_wall)
    per = "per GPU" if gpus else "on CPU (dry run)"
    out.update({
        "audio_hours": full.audio_seconds / 3600, "segments": full.segments, "quarantined": len(full.quarantined),
        "x_real_time_end_to_end": figure(e2e, TOKENIZE_TARGET_XRT, f"x real time {per}",
                                         note="pass 2 over the whole corpus, Ray start and actor loading included"),
        "x_real_time_steady_state": figure(steady, TOKENIZE_TARGET_XRT, f"x real time {per}", note=why),
        "fixed_seconds_per_run": round(fixed, 1) if fixed is not None else None,
        "codebook_heldout_loss": {r: cb.heldout_loss for r, cb in fit.codebooks.items()},
    })
    util = GpuSampler.summary(gpu) if ctx.cuda else {"mean_utilisation": None, "reason": "no GPU (dry run)"}
    out["gpu_utilisation"] = figure(util.pop("mean_utilisation"), GPU_UTIL_TARGET, "share of samples' utilisation "
                                    "during the full pass 2", note="nvidia-smi utilization.gpu, every 200 ms")
    out["gpu_sampling"] = util
    out["time_split"] = component_split(ctx, full_cfg, files)
    return out


def component_split(ctx: Context, cfg, files: list[str]) -> dict[str, Any]:
    """Where tokenisation time goes: decode, each teacher, MVQ and the Parquet write, each measured
    alone in this process on the same machine, as x real time (decode and write at the CPUs the
    job has for them, the GPU parts on one GPU). The slowest is the job's bottleneck."""
    import pyarrow.parquet as pq
    import torch

    from spear.stages.artefacts import load_quantizer
    from spear.stages.audio import decode_segments, pcm16_to_float
    from spear.stages.batching import plan_subbatches
    from spear.stages.teacher_loading import load_teacher

    sample = files[: (8 if ctx.dry else 40)]  # half speech-domain, half audio-domain
    t0 = time.process_time()
    segs: list[tuple[str, np.ndarray]] = []
    for f in sample:
        with open(f, "rb") as fh:
            _, parts = decode_segments(fh.read(), max_segment_seconds=cfg.decode.max_segment_seconds)
        segs += [("speech" if "/speech/" in f else "audio", pcm16_to_float(p)) for _, p in parts]
    decode_cpu = time.process_time() - t0
    seconds = sum(len(w) for _, w in segs) / 16000
    decode_cpus = max(1, ctx.cpus - 2)
    out: dict[str, Any] = {"note": "each part alone in one process; decode and write scaled to the CPUs the job "
                                   f"leaves them ({decode_cpus}); teacher and MVQ on one {ctx.device}"}
    out["decode"] = figure(seconds / max(decode_cpu, 1e-9) * decode_cpus, TOKENIZE_TARGET_XRT, "x real time",
                           note=f"{seconds / max(decode_cpu, 1e-9):.0f}x per CPU (WAV: the cheapest codec)")
    tokens_cfg = ctx.made["tokens"]
    for role, tcfg in (("speech", cfg.teachers.speech), ("audio", cfg.teachers.audio)):
        teacher = load_teacher(tcfg, device=ctx.device)
        q = load_quantizer(tokens_cfg["codebooks"][role], device=ctx.device)
        waves = [w for d, w in segs if role == "speech" or d == "audio"]
        lengths = np.array([len(w) for w in waves])
        batches = plan_subbatches(lengths, int(tcfg.batch_seconds * 16000))
        t_teacher = t_mvq = 0.0
        secs = 0.0
        for k, idx in enumerate(batches):
            L = lengths[idx]
            x = np.zeros((len(idx), int(L.max())), np.float32)
            for j, i in enumerate(idx):
                x[j, : L[j]] = waves[i]
            ctx.sync()
            a = time.perf_counter()
            o = teacher(torch.from_numpy(x), torch.from_numpy(L))
            ctx.sync()
            b = time.perf_counter()
            valid = o.embeddings[torch.arange(o.embeddings.shape[1], device=o.embeddings.device)[None]
                                 < o.num_frames.to(o.embeddings.device)[:, None]]
            q.encode(valid)
            ctx.sync()
            c = time.perf_counter()
            if k or len(batches) == 1:  # the first batch pays one-off CUDA set-up
                t_teacher, t_mvq, secs = t_teacher + b - a, t_mvq + c - b, secs + float(L.sum()) / 16000
        out[f"teacher_{role}"] = figure(secs / max(t_teacher, 1e-9), TOKENIZE_TARGET_XRT, "x real time",
                                        note=f"{teacher.name} layer {teacher.layer}, "
                                             + ("bf16 autocast" if ctx.cuda else "float32 on the CPU (dry run)"))
        out[f"mvq_{role}"] = figure(secs / max(t_mvq, 1e-9), TOKENIZE_TARGET_XRT, "x real time",
                                    note=f"{q.num_codebooks} codebooks x {q.codebook_size}, {q.dim}-d")
        del teacher, q
        if ctx.cuda:
            torch.cuda.empty_cache()
    # write: the job's own shard rows rewritten as Parquet, scaled to the CPUs
    from spear.pipeline.ledger import TokenStore

    shard = sorted(TokenStore(tokens_cfg["output"], tokens_cfg["version"]).shard_files())[0]
    table = pq.read_table(shard)
    secs = float(np.sum(table["duration"].to_numpy())) if "duration" in table.column_names else None
    t0 = time.perf_counter()
    pq.write_table(table, os.path.join(ctx.work, "rewrite.parquet"))
    w = time.perf_counter() - t0
    out["write"] = figure(secs / max(w, 1e-9) * decode_cpus if secs else None, TOKENIZE_TARGET_XRT, "x real time",
                          note="one shard of the job rewritten with pyarrow, scaled to the CPUs")
    return out


# ----------------------------------------------------------------------------- codebooks and MVQ


def teacher_frames(ctx: Context, seconds: float):
    """WavLM-Large-shaped frames (layer 21) of ``seconds`` of generated audio, on the device."""
    import torch

    from spear.config import TeacherConfig
    from spear.stages.teacher_loading import load_teacher

    t = make_teachers(ctx)
    teacher = load_teacher(TeacherConfig(kind="wavlm", path=t["speech"], layer=21), device=ctx.device)
    rng = np.random.default_rng(1)
    seg = 16000 * 30
    frames = []
    with torch.no_grad():
        for _ in range(max(1, int(seconds // 120))):
            x = torch.from_numpy((0.1 * rng.standard_normal((4, seg))).astype(np.float32))
            frames.append(torch.cat(teacher(x, torch.full((4,), seg)).unbatch()).float())
    del teacher
    ctx.say(f"{sum(f.shape[0] for f in frames)} WavLM-shaped frames made")
    return torch.cat(frames)


@contextlib.contextmanager
def faiss_on_cpu():
    """faiss as if it saw no GPU (the k-means picks its index by faiss.get_num_gpus())."""
    import faiss

    before = faiss.get_num_gpus
    faiss.get_num_gpus = lambda: 0
    try:
        yield
    finally:
        faiss.get_num_gpus = before


def section_codebooks(ctx: Context) -> dict[str, Any]:
    if (skip := ctx.no_gpu()) is not None:
        return skip
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed (pip install faiss-cpu, or the project's [gpu] extra for faiss-gpu)"}
    from spear.models.mvq import MultiCodebookQuantizer
    from spear.models.mvq.fitting import FitSettings

    frames = teacher_frames(ctx, 60.0 if ctx.dry else 2400.0)  # 120,000 frames on the GPU
    st = (FitSettings(num_codebooks=4, codebook_size=16, refine_iters=1, heldout_fraction=0.05) if ctx.dry
          else FitSettings(num_codebooks=16, codebook_size=256, heldout_fraction=0.05))
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    out: dict[str, Any] = {"device": ctx.device, "frames": int(frames.shape[0]), "dim": int(frames.shape[1]),
                           "codebooks": f"{st.num_codebooks} x {st.codebook_size}", "faiss_gpus": gpus,
                           "faiss_version": getattr(faiss, "__version__", None)}
    runs: dict[str, tuple[float, float]] = {}
    # faiss_gpu: the [gpu] extra; torch_gpu: the default where faiss sees no GPU (the faiss-cpu wheel);
    # faiss_cpu: the reference, faiss' k-means on every CPU of this process
    for name, backend, ctxm in (("faiss_gpu", "faiss", contextlib.nullcontext()), ("torch_gpu", "torch", contextlib.nullcontext()),
                                ("faiss_cpu", "faiss", faiss_on_cpu())):
        if name == "faiss_gpu" and gpus == 0:
            out[name] = {"skipped": "faiss sees no GPU (faiss-cpu wheel, or no CUDA): install the [gpu] extra"}
            continue
        with ctxm:
            ctx.sync()
            t0 = time.perf_counter()
            q = MultiCodebookQuantizer.fit(frames, dataclasses.replace(st, kmeans_backend=backend), device=ctx.device)
            ctx.sync()
            runs[name] = (time.perf_counter() - t0, float(q.metadata["heldout_relative_loss"]))
            ctx.say(f"codebooks: {name} fit in {runs[name][0]:.1f} s")
    ref = runs.get("faiss_cpu")  # the reference the GPU paths are measured against
    if ref:
        out["faiss_cpu_seconds"] = _round(ref[0])
        out["faiss_cpu_heldout_loss"] = figure(ref[1], 1.0, "relative", better="lower",
                                               note="below 1: better than the frames' mean")
    for name in ("faiss_gpu", "torch_gpu"):
        if name in runs:
            out[f"{name}_seconds"] = figure(runs[name][0], ref[0] if ref else None, "s", better="lower",
                                            note="target: the faiss-cpu fit's time")
            out[f"{name}_heldout_loss"] = figure(runs[name][1], ref[1] * 1.02 if ref else None, "relative",
                                                 better="lower", note="target: within 2% of faiss-cpu's")
    ctx.made["frames"] = frames
    return out


def section_mvq_encode(ctx: Context) -> dict[str, Any]:
    if (skip := ctx.no_gpu()) is not None:
        return skip
    import torch

    from spear.models.mvq import MultiCodebookQuantizer
    from spear.models.mvq.fitting import FitSettings
    from spear.stages.artefacts import save_quantizer
    from spear.stages.quantize import QuantizerEncoder

    uri = (ctx.made.get("tokens") or {}).get("codebooks", {}).get("speech")
    source = "the tokenize section's speech codebooks"
    if uri is None:  # tokenize did not run: fit codebooks of the job's shape here
        frames = ctx.made.get("frames")
        if frames is None:
            frames = teacher_frames(ctx, 60.0 if ctx.dry else 600.0)
        st = (FitSettings(num_codebooks=4, codebook_size=16, refine_iters=0) if ctx.dry
              else FitSettings(num_codebooks=16, codebook_size=256, refine_iters=0))
        uri = os.path.join(ctx.work, "mvq-encode-codebooks")
        save_quantizer(MultiCodebookQuantizer.fit(frames, st, device=ctx.device), uri)
        ctx.say("mvq_encode: codebooks fitted")
        source = "codebooks fitted in this section (tokenize did not run)"
    encode = QuantizerEncoder(uri)  # the hook the teacher actor calls, loaded the same way
    q = encode.quantizer
    n = 20_000 if ctx.dry else 1_000_000
    x = torch.randn(n, q.dim, device=ctx.device) * 0.5
    encode(x[:1000])  # warm-up: codebooks to the device, kernels
    ctx.sync()
    t0 = time.perf_counter()
    codes = encode(x)
    ctx.sync()
    dt = time.perf_counter() - t0
    return {"device": ctx.device, "codebooks": source, "num_codebooks": q.num_codebooks, "codebook_size": q.codebook_size,
            "dim": q.dim, "frames": n, "codes_dtype": str(codes.dtype),
            "frames_per_second": figure(n / dt, MVQ_TARGET_FPS, "frames/s on one GPU" if ctx.cuda else "frames/s (CPU)",
                                        note="250,000 = WavLM at 50 Hz x 5,000x real time")}


# ----------------------------------------------------------------------------- train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_train(ctx: Context) -> dict[str, Any]:
    if (skip := ctx.no_gpu()) is not None:
        return skip
    if "tokens" not in ctx.made:
        return {"skipped": "needs the tokenize section's shards (run it first, or with it)"}
    import torch
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from spear.cluster.storage import Storage
    from spear.config import load_config
    from spear.models.frontend import KaldiFbank
    from spear.pipeline.ledger import TokenStore
    from spear.pipeline.train_job import plan_training_data
    from spear.stages.train_data import TrainBatches
    from spear.stages.train_loop import build_objective, build_optimizer, prepare_batch

    tok = ctx.made["tokens"]
    sets = ["train.batch_seconds=10", "train.student.size=tiny"] if ctx.dry else []
    cfg = load_config("spear-large-unified", sets + (["train.batch_seconds=%g" % ctx.args.train_batch_seconds]
                                                    if ctx.args.train_batch_seconds else [])).train
    plan = plan_training_data(TokenStore(tok["output"], tok["version"], Storage()))
    device = torch.device(ctx.device)
    backend = "nccl" if ctx.cuda else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        objective = build_objective(cfg, plan).to(device)
        params = sum(p.numel() for p in objective.encoder.parameters())
        optimizer, scheduler, _ = build_optimizer(objective, cfg, 1, 1)
        model = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[0] if ctx.cuda else None)
        fbank = KaldiFbank(num_mel_bins=cfg.student.num_mel_bins).to(device)
        gen = torch.Generator().manual_seed(0)
        steps = ctx.args.train_steps or (2 if ctx.dry else 8)
        loader = iter(TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=cfg.batch_seconds,
                                   audio_weight=cfg.audio_weight, seed=0))
        batches = []
        for _ in range(2 * steps + 2):
            try:
                batches.append(prepare_batch(next(loader), plan, cfg, objective.encoder, fbank, gen, device))
            except StopIteration:
                break
        ctx.say(f"train: {len(batches)} batches read; {params / 1e6:.1f}M-parameter student")
        if len(batches) < 3:
            return {"skipped": f"only {len(batches)} batches of {cfg.batch_seconds:g} s in the token dataset"}

        def step(b, dtype) -> float:
            masked, feat_lens, targets, _ = b
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(masked.feats, feat_lens, targets, frame_mask=masked.frame_mask)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step(epoch=0.0) if cfg.optimizer_kind == "scaled_adam" else scheduler.step()
            return float(out.loss.detach())

        with FlopCounterMode(display=False) as fc:  # one step's model FLOPs (forward + backward)
            step(batches[0], None)
        flops_step, audio_step = fc.get_total_flops(), batches[0][3]
        peak = ctx.peak_flops()
        out: dict[str, Any] = {"device": ctx.device, "gpu": ctx.gpu_name, "backend": backend, "world_size": 1,
                               "student": f"{cfg.student.architecture} {cfg.student.size}",
                               "student_frame_rate": float(objective.encoder.frame_rate),
                               "params": params, "optimizer": cfg.optimizer_kind,
                               "batch_seconds": cfg.batch_seconds, "model_flops_per_audio_second": flops_step / audio_step,
                               "peak_bf16_flops": peak}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16 if ctx.cuda else None)):
            if name == "bf16" and not ctx.cuda:
                out[name] = {"skipped": "bf16 autocast is measured on the GPU only"}
                continue
            if ctx.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            use = batches[1:] if name == "fp32" else batches[1 + steps // 2:] + batches[1:1 + steps // 2]
            step(use[0], dtype)  # warm-up
            ctx.sync()
            t0 = time.perf_counter()
            audio = 0.0
            for b in use[1:steps + 1]:
                step(b, dtype)
                audio += b[3]
            ctx.sync()
            n = len(use[1:steps + 1])
            dt = (time.perf_counter() - t0) / max(1, n)
            rate = audio / n / dt
            flops_per_s = rate * flops_step / audio_step
            target_rate = MFU_TARGET * peak / (flops_step / audio_step) if peak else None
            out[name] = {
                "steps": n,
                "seconds_per_step": figure(dt, cfg.batch_seconds / target_rate if target_rate else None, "s/step",
                                           better="lower", note=f"target at {MFU_TARGET:.0%} MFU"),
                "audio_seconds_per_second": figure(rate, target_rate, "audio s/s", note=f"target at {MFU_TARGET:.0%} MFU"),
                "model_flop_utilisation": figure(flops_per_s / peak if peak else None, MFU_TARGET, "share of peak bf16",
                                                 note="FLOPs from FlopCounterMode; peak from the GPU's name"),
                "peak_memory_gib": figure(torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None,
                                          0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30 if ctx.cuda
                                          else None, "GiB", better="lower", note="target: 90% of the GPU's memory"),
            }
        out["note"] = ("bf16 is what stages/train_loop.py runs on a GPU by default (train.precision: bf16, "
                       "torch.autocast(bfloat16) around the forward pass); fp32 is train.precision: fp32")
        return out
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- decode


def _write_mixed(job: tuple[str, str, str, int, int, float, int]) -> None:
    import soundfile as sf

    path, fmt, sub, rate, ch, seconds, seed = job
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
    sig = 0.1 * env * rng.standard_normal(n) + 0.1 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t)
    x = np.stack([sig] * ch, axis=1).astype(np.float32)
    with sf.SoundFile(path, "w", rate, ch, format=fmt, subtype=sub) as f:
        for j in range(0, n, rate):  # chunked: one big Vorbis write crashes libsndfile
            f.write(x[j:j + rate])


def section_decode(ctx: Context) -> dict[str, Any]:
    import decode

    from spear.cluster.ray_runtime import ray_session
    from spear.config import DecodeConfig, RayConfig

    hours = ctx.args.decode_hours if ctx.args.decode_hours is not None else (2 / 60 if ctx.dry else 3.0)
    file_seconds = 20.0 if ctx.dry else 40.0
    n = max(2 * ctx.cpus, int(math.ceil(hours * 3600 / file_seconds)))
    root = os.path.join(ctx.work, "decode-corpus")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    kinds = rng.choice(len(MIX), size=n, p=[m[-1] for m in MIX])  # bench/decode.py's format mix
    jobs = [(os.path.join(root, f"f{i:05d}.{MIX[k][2]}"), *MIX[k][:2], MIX[k][3], MIX[k][4],
             file_seconds, i) for i, k in enumerate(kinds)]
    with multiprocessing.get_context("spawn").Pool(max(1, ctx.cpus)) as pool:
        pool.map(_write_mixed, [(j[0], j[1], j[2], j[3], j[4], j[5], j[6]) for j in jobs], chunksize=2)
    paths = [j[0] for j in jobs]
    decode.reference_loop(paths[:3])  # warm the page cache and the codecs
    t0 = time.perf_counter()
    ref_seconds = decode.reference_loop(paths)
    ref_wall = time.perf_counter() - t0
    with ray_session(RayConfig(num_cpus=ctx.cpus)):
        full_s, full_w, part_s, part_w = decode.ray_stage(paths, DecodeConfig(), ctx.cpus)
    steady, fixed, why = steady_state(full_s, full_w, part_s, part_w)
    loop_rate = ref_seconds / ref_wall
    target = 0.8 * ctx.cpus
    return {"cpus": ctx.cpus, "audio_hours": ref_seconds / 3600, "files": n,
            "loop_x_real_time": _round(loop_rate),  # the reference: soundfile + soxr, one process
            "ray_stage_over_loop_end_to_end": figure((full_s / full_w) / loop_rate, target, "x the loop",
                                                     note=f"target 0.8 x {ctx.cpus} CPUs"),
            "ray_stage_over_loop_steady_state": figure(steady / loop_rate if steady else None, target, "x the loop",
                                                       note=why),
            "fixed_seconds_per_run": round(fixed, 2) if fixed is not None else None}


# ----------------------------------------------------------------------------- main


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "tokenize": section_tokenize, "codebooks": section_codebooks, "mvq_encode": section_mvq_encode,
    "train": section_train, "decode": section_decode,
}
# Seconds a section needs at least on the GPU machine: with less left, it is skipped, not cut off.
MIN_SECONDS = {"tokenize": 150, "codebooks": 40, "mvq_encode": 10, "train": 60, "decode": 60}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    ctx = Context(args)
    result: dict[str, Any] = {
        "check": "spear gpu_check", "dry_run": ctx.dry, "device": ctx.device, "gpu": ctx.gpu_name,
        "gpu_visible": torch.cuda.is_available(), "cpus": ctx.cpus, "torch": torch.__version__,
        "note": ("dry run: tiny sizes on the CPU; the figures test the script, not the machine" if ctx.dry else
                 ("" if ctx.cuda else "no CUDA GPU visible: the GPU sections say so and only decode runs")),
        "sections": {},
    }
    try:
        for name in args.sections:
            if not ctx.dry and ctx.left() < MIN_SECONDS[name]:
                result["sections"][name] = {"skipped": f"time budget: {ctx.left():.0f} s left of --budget-s {ctx.budget:g}"}
                continue
            t0 = time.monotonic()
            try:
                res = RUNNERS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one section's failure must not hide the others' figures
                res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                       "traceback": traceback.format_exc().splitlines()[-8:]}
            res["seconds"] = round(time.monotonic() - t0, 1)
            result["sections"][name] = res
            print(f"[gpu_check] {name}: {res['seconds']:.0f} s" + (f" ({res.get('error') or res.get('skipped')})"
                                                                  if "error" in res or "skipped" in res else ""),
                  file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1, default=str)
    finally:
        result["wall_seconds"] = round(time.monotonic() - ctx.t0, 1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
        if not args.keep and not args.work:
            shutil.rmtree(ctx.work, ignore_errors=True)
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU (no GPU, no faiss-gpu)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--out", help="also write the JSON here, after every section")
    ap.add_argument("--work", help="work folder (kept; default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--cpus", type=int, help="CPUs for Ray (default: all; 2 in a dry run)")
    ap.add_argument("--hours", type=float, help="tokenize corpus hours (default 8; 3 min in a dry run)")
    ap.add_argument("--decode-hours", type=float, help="decode corpus hours (default 3; 2 min in a dry run)")
    ap.add_argument("--train-steps", type=int, help="timed training steps per precision (default 8; 3 in a dry run)")
    ap.add_argument("--train-batch-seconds", type=float, help="audio seconds per training batch (default: the recipe's)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would start with less time left")
    args = ap.parse_args(argv)
    order = [s for s in SECTIONS if s in args.sections]  # train needs tokenize's shards, mvq_encode its codebooks
    args.sections = order
    return args


def main(argv: Optional[list[str]] = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
