"""Decode throughput: the Ray decode stage vs a single-process soundfile + soxr loop, one run.

    python bench/decode.py                 # ~36 min of mixed-format audio, all CPUs
    python bench/decode.py --minutes 10 --cpus 2

Prints x real time for
  (1) reference: a plain loop, soundfile.read + downmix + soxr.resample, one process;
  (2) our per-object decode (the stage's function: stream decode, segment, FLAC-encode) in one process;
  (3) the Ray Data decode stage on N CPUs,
and the ratio (3)/(1), against the target 0.8 x N, and the stage's steady-state rate (a full run
minus a quarter run: the fixed cost of starting a run is paid once per job, not per file).
The corpus (FLAC 44.1k stereo, WAV 16k mono, Ogg/Vorbis 22.05k, MP3 48k, Opus 48k) is generated once
into --cache and reused.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import soxr

from common import make_corpus, steady_state


def reference_loop(paths: list[str]) -> float:
    """soundfile + soxr, whole file at a time: returns audio seconds decoded."""
    total = 0.0
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        y = soxr.resample(x.mean(axis=1), sr, 16000)
        total += len(y) / 16000
    return total


def our_function_loop(paths: list[str], cfg) -> float:
    from spear.stages.decode import _empty_columns, decode_object

    total = 0.0
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        cols = _empty_columns()
        decode_object({"uri": p, "source": "bench", "relative_path": os.path.basename(p), "etag": "",
                       "size": len(data), "domain": "speech"}, data, cfg, cols)
        total += sum(cols["duration"])
    return total


def ray_stage(paths: list[str], cfg, cpus: int) -> tuple[float, float, float, float]:
    """The decode stage over ``paths``, then over a quarter of them: (audio s, wall s) of each.

    The two runs give the stage's fixed cost per run (planning, first tasks) apart from its
    steady-state rate: (A - a) / (W - w).
    """
    from spear.cluster.ray_runtime import ray_data_without_progress_bars
    from spear.config import SourceConfig
    from spear.stages.catalog import build_catalog
    from spear.stages.decode import decode_dataset

    catalog = build_catalog([SourceConfig(uri=os.path.dirname(paths[0]), domain="speech")])
    ray_data_without_progress_bars()

    def run(objects) -> tuple[float, float]:
        t0 = time.perf_counter()
        total = 0.0
        for batch in decode_dataset(objects, cfg).select_columns(["duration"]).iter_batches(batch_size=None,
                                                                                            batch_format="pyarrow"):
            total += float(np.sum(batch["duration"].to_numpy(zero_copy_only=False)))
        return total, time.perf_counter() - t0

    # Warm-up: start the worker processes and import the codecs once, as a long job would have.
    run(catalog.objects.slice(0, 2 * cpus))
    full_seconds, full_wall = run(catalog.objects)
    part_seconds, part_wall = run(catalog.objects.slice(0, max(2 * cpus, catalog.objects.num_rows // 4)))
    return full_seconds, full_wall, part_seconds, part_wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=36.0, help="audio in the bench corpus (>= 30 for the target)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the Ray stage")
    ap.add_argument("--objects-per-task", type=int, default=8, help="objects per decode task (decode.objects_per_task)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-decode"))
    args = ap.parse_args()

    from spear.cluster.ray_runtime import ray_session
    from spear.config import DecodeConfig, RayConfig

    paths = make_corpus(os.path.join(args.cache, f"m{args.minutes:g}"), args.minutes)
    cfg = DecodeConfig(objects_per_task=args.objects_per_task)
    for p in paths[:3]:  # warm the page cache and the codecs
        reference_loop([p])

    t0 = time.perf_counter()
    ref_seconds = reference_loop(paths)
    ref_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_seconds = our_function_loop(paths, cfg)
    ours_wall = time.perf_counter() - t0
    with ray_session(RayConfig(num_cpus=args.cpus)):
        ray_seconds, ray_wall, part_seconds, part_wall = ray_stage(paths, cfg, args.cpus)
    steady, fixed, why = steady_state(ray_seconds, ray_wall, part_seconds, part_wall)

    rows = [("reference loop (soundfile+soxr, 1 process)", ref_seconds, ref_wall),
            ("spear decode function (1 process)", ours_seconds, ours_wall),
            (f"spear Ray decode stage ({args.cpus} CPUs)", ray_seconds, ray_wall)]
    print(f"\ndecode bench: {len(paths)} files, {ref_seconds / 60:.1f} min of audio, {args.cpus} CPUs "
          f"(machine has {os.cpu_count()})")
    print(f"{'path':48s} {'audio s':>9s} {'wall s':>8s} {'x real time':>12s} {'x RT / CPU':>11s}")
    for name, secs, wall in rows:
        cpus = args.cpus if "Ray" in name else 1
        print(f"{name:48s} {secs:9.1f} {wall:8.2f} {secs / wall:12.0f} {secs / wall / cpus:11.0f}")
    ratio = (ray_seconds / ray_wall) / (ref_seconds / ref_wall)
    target = 0.8 * args.cpus
    print(f"\nRay stage / reference loop: {ratio:.2f}x  (target >= 0.8 x {args.cpus} = {target:.2f}x: "
          f"{'met' if ratio >= target else 'NOT met'})")
    print(f"spear function / reference loop (1 process): {(ours_seconds / ours_wall) / (ref_seconds / ref_wall):.2f}x")
    if steady is None:
        print(f"Ray stage steady state (full run minus a quarter run): {why}")
    else:
        print(f"Ray stage steady state (full run minus a quarter run): {steady:.0f} x real time = "
              f"{steady / (ref_seconds / ref_wall):.2f}x the loop; fixed cost per run {fixed:.1f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
