"""Teacher actor memory: the peak a teacher stage reaches on one Ray batch against what tokenize reserves for it.

    python bench/teacher_memory.py                                  # mfcc, fbank, resemblyzer, crepe; ~3 min on 2 cores
    python bench/teacher_memory.py --teachers crepe --rows 96 --seconds 30
    python bench/teacher_memory.py --teachers wavlm --checkpoint wavlm=/models/wavlm-large --rows 4

Each teacher runs in a fresh process (so the figure is its own, as in a Ray actor): a
:class:`~spear.stages.teacher.TeacherStage` is built as tokenize builds it and maps the same Ray
batch twice (``--rows`` segments of ``--seconds`` of noise, FLAC-encoded, sub-batches of
``--batch-seconds``). The peak unique set size (USS, what Ray Data's memory detector reads) is
sampled every 20 ms. Printed per teacher: the peak, the reservation
:func:`~spear.stages.teacher.teacher_actor_memory` computes for that batch, and their ratio. Ray
Data warns when an actor's peak is above 4/5 of its reservation, so a ratio of at least 1.25
means no warning; a Ray worker adds about 150-200 MiB to the peak measured here, which the
reservation's base allows for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

MIB = 1 << 20
WARN_RATIO = 1.25  # Ray Data's high-memory detector: a peak above 4/5 of the reservation warns


def uss_bytes() -> int:
    """This process' unique set size (private pages), as Ray's memory metrics count it."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean", "Private_Dirty")):
                total += int(line.split()[1]) * 1024
    return total


def measure(kind: str, rows: int, seconds: float, batch_seconds: float, checkpoint: str | None) -> dict:
    """In this process: build the stage, map one batch twice, return the peak USS and the reservation."""
    import numpy as np
    import torch

    from spear.cluster.storage import Storage
    from spear.config import TeacherConfig
    from spear.pipeline.tokenize_job import teacher_fingerprint, teacher_footprint
    from spear.stages.audio import flac_encode, float_to_pcm16
    from spear.stages.teacher import TeacherStage, teacher_actor_memory

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    cfg = TeacherConfig(kind=kind, batch_seconds=batch_seconds, **({"path": checkpoint} if checkpoint else {}))
    stage = TeacherStage(cfg, column_prefix="bench", device="cpu")
    loaded = uss_bytes()
    rng = np.random.default_rng(0)
    n = int(seconds * 16000)
    audio = np.empty(rows, dtype=object)
    for i in range(rows):
        audio[i] = flac_encode(float_to_pcm16((0.1 * rng.standard_normal(n)).astype(np.float32)))
    batch = {"audio": audio, "num_samples": np.full(rows, n), "domain": np.array(["speech"] * rows, dtype=object),
             "segment_id": np.array([f"s{i}" for i in range(rows)], dtype=object)}
    peak, done = [uss_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], uss_bytes())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    for _ in range(2):
        stage(batch)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    # the footprint as tokenize computes it: file sizes from the teacher's fingerprint, output from its description
    footprint = teacher_footprint(cfg, teacher_fingerprint(cfg, Storage()), stage.teacher.describe(), seconds, 16000)
    reserved = teacher_actor_memory(kind, footprint, rows=rows, batch_seconds=batch_seconds, on_gpu=False)
    return {"kind": kind, "rows": rows, "seconds": seconds, "batch_seconds": batch_seconds,
            "loaded_mib": round(loaded / MIB), "peak_mib": round(peak[0] / MIB), "reserved_mib": round(reserved / MIB),
            "ratio": round(reserved / peak[0], 2), "audio_x_real_time": round(2 * rows * seconds / wall, 1)}


def measure_in_child(kind: str, rows: int, seconds: float, batch_seconds: float, checkpoint: str | None = None,
                     timeout: float = 1800) -> dict:
    """:func:`measure` in a fresh Python process (this file with ``--child``): the figure is the teacher's own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--teachers", kind, "--rows", str(rows),
           "--seconds", str(seconds), "--batch-seconds", str(batch_seconds)]
    if checkpoint:
        cmd += ["--checkpoint", f"{kind}={checkpoint}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {kind} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="mfcc,fbank,resemblyzer,crepe")
    ap.add_argument("--rows", type=int, default=32, help="segments per Ray batch (tokenize: 96 at 120 s sub-batches)")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds per segment (the longest decode cuts)")
    ap.add_argument("--batch-seconds", type=float, default=120.0, help="teacher.batch_seconds")
    ap.add_argument("--checkpoint", action="append", default=[], help="KIND=PATH for a teacher with weights")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    kinds = [k for k in args.teachers.split(",") if k]
    if args.child:
        print(json.dumps(measure(kinds[0], args.rows, args.seconds, args.batch_seconds, checkpoints.get(kinds[0]))))
        return
    print(f"one Ray batch of {args.rows} x {args.seconds:g} s, sub-batches of {args.batch_seconds:g} s, CPU; "
          f"ratio = reserved / peak (>= {WARN_RATIO}: Ray Data does not warn)")
    print(f"{'teacher':<12} {'loaded MiB':>10} {'peak MiB':>9} {'reserved MiB':>12} {'ratio':>6}  x real time")
    for kind in kinds:
        r = measure_in_child(kind, args.rows, args.seconds, args.batch_seconds, checkpoints.get(kind))
        flag = "" if r["ratio"] >= WARN_RATIO else "  <- Ray Data would warn"
        print(f"{kind:<12} {r['loaded_mib']:>10} {r['peak_mib']:>9} {r['reserved_mib']:>12} {r['ratio']:>6.2f}  "
              f"{r['audio_x_real_time']:>6.1f}{flag}", flush=True)


if __name__ == "__main__":
    main()
