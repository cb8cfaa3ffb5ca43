"""Post-training data preparation: `prepare_posttrain_data` on Ray vs a single-process loop, one run.

    python bench/posttrain_data.py             # the multilingual demo corpus (912 utterances, ~21 min), all CPUs
    python bench/posttrain_data.py --cpus 2 --copies 2

Prints x real time for
  (1) reference: a plain loop over the manifests' rows, soundfile.read + soxr.resample to 16 kHz + FLAC
      encode (what any preparation must do per row), one process;
  (2) `prepare_posttrain_data` on N CPUs (manifests read and checked, Ray decode tasks, Parquet tables and
      quarantine written), with Ray already started, as a job has it;
  (3) the same call again: the reuse check (manifests unchanged),
and the ratio (2)/(1). The corpus (synthetic/multilingual.py, demo size) is generated once into --cache;
``--copies`` lists each manifest that many times under other ids (more rows, the same files).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import soxr


def copied_manifest(src: str, dst: str, copies: int) -> list[str]:
    """``src``'s rows ``copies`` times (ids suffixed) into ``dst``; the audio paths of the rows."""
    rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    folder = os.path.dirname(os.path.abspath(src))
    out, audio = [], []
    for k in range(copies):
        for r in rows:
            out.append({**r, "id": f"{r['id']}#{k}", "audio": os.path.join(folder, r["audio"])})
            audio.append(out[-1]["audio"])
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return audio


def reference_loop(paths: list[str]) -> float:
    """soundfile + soxr + FLAC per row, one process: audio seconds prepared."""
    from spear.stages.audio import flac_encode, float_to_pcm16

    total = 0.0
    for p in paths:
        with open(p, "rb") as fh:
            x, sr = sf.read(io.BytesIO(fh.read()), dtype="float32", always_2d=True)
        y = x.mean(axis=1)
        if sr != 16000:
            y = soxr.resample(y, sr, 16000)
        flac_encode(float_to_pcm16(y))
        total += y.size / 16000
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the embedded Ray")
    ap.add_argument("--copies", type=int, default=1, help="list every manifest row this many times")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-posttrain"))
    args = ap.parse_args()

    from spear.cluster.ray_runtime import ray_session
    from spear.cluster.storage import Storage
    from spear.config import RayConfig
    from spear.stages.posttrain_data import prepare_posttrain_data
    from spear.synthetic.multilingual import generate_multilingual_corpus

    corpus = generate_multilingual_corpus(os.path.join(args.cache, "corpus"), size="demo", progress=print)
    work = tempfile.mkdtemp(prefix="spear-bench-pt-")
    try:
        train = os.path.join(work, "train.jsonl")
        evals = os.path.join(work, "eval.jsonl")
        paths = copied_manifest(str(corpus.train_manifest), train, args.copies)
        paths += copied_manifest(str(corpus.eval_manifest), evals, args.copies)
        reference_loop(paths[:20])   # warm the page cache and the codecs
        t0 = time.perf_counter()
        ref_seconds = reference_loop(paths)
        ref_wall = time.perf_counter() - t0
        with ray_session(RayConfig(num_cpus=args.cpus), dashboard=False):
            t0 = time.perf_counter()
            prepared = prepare_posttrain_data([train], [evals], os.path.join(work, "data"), Storage(), progress=False)
            ours_wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = prepare_posttrain_data([train], [evals], os.path.join(work, "data"), Storage(), progress=False)
            reuse_wall = time.perf_counter() - t0
        assert again.reused
        ours_seconds = sum(prepared.seconds.values())
        print(f"\nposttrain data bench: {len(paths)} rows, {ref_seconds / 60:.1f} min of audio, {args.cpus} CPUs "
              f"(machine has {os.cpu_count()})")
        print(f"{'path':52s} {'audio s':>9s} {'wall s':>8s} {'x real time':>12s}")
        for name, secs, wall in (("reference loop (soundfile+soxr+FLAC, 1 process)", ref_seconds, ref_wall),
                                 (f"prepare_posttrain_data ({args.cpus} CPUs, Ray started)", ours_seconds, ours_wall)):
            print(f"{name:52s} {secs:9.1f} {wall:8.2f} {secs / wall:12.0f}")
        ratio = (ours_seconds / ours_wall) / (ref_seconds / ref_wall)
        print(f"\nprepare_posttrain_data / reference loop: {ratio:.2f}x on {args.cpus} CPUs "
              f"({ratio / args.cpus:.2f}x per CPU)")
        print(f"reuse check (manifests unchanged): {reuse_wall * 1000:.1f} ms")
        assert np.isclose(ours_seconds, ref_seconds, rtol=1e-3), (ours_seconds, ref_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
