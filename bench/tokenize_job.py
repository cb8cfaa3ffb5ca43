"""Tokenisation throughput: the Ray job (pass 2: decode -> teachers + MVQ -> shards) vs a
single-process loop doing the same decode -> teacher -> encode, measured in one run.

    python bench/tokenize_job.py                    # ~20 min of audio, weight-free teachers (mfcc + fbank)
    python bench/tokenize_job.py --minutes 5

Prints audio hours per hour per CPU for the loop and for the Ray job on 1 CPU and on all CPUs,
the scaling efficiency (throughput on N CPUs / (N x throughput on 1 CPU)), and the token
columns' bytes per audio hour against their raw uint8 size (target <= 1.1x).
Codebooks are fitted once (pass 1) before anything is timed; every timed run reuses them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from common import make_corpus, steady_state


def single_process_loop(paths, cfg, codebooks) -> float:
    """decode -> teacher -> MVQ encode, one segment at a time, no Ray: returns audio seconds."""
    from spear.stages.artefacts import load_quantizer
    from spear.stages.teacher_loading import load_teacher
    from spear.stages.audio import decode_segments, pcm16_to_float

    teachers = {"speech": load_teacher(cfg.teachers.speech), "audio": load_teacher(cfg.teachers.audio)}
    qs = {role: load_quantizer(cb.uri) for role, cb in codebooks.items()}
    total = 0.0
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        _, segments = decode_segments(data, max_segment_seconds=cfg.decode.max_segment_seconds)
        for _, pcm in segments:
            wav = torch.from_numpy(pcm16_to_float(pcm))[None]
            for role in ("speech", "audio"):  # the bench corpus is audio-domain: both teachers run
                emb = teachers[role](wav, torch.tensor([wav.shape[1]])).unbatch()[0]
                qs[role].encode(emb)
            total += len(pcm) / cfg.decode.sample_rate
    return total


def ray_run(corpus_dir, out, codebook_dir, cpus, base_sets):
    """Pass 2 over the corpus, then over a quarter of it (fresh outputs, the same codebooks).

    Returns (summary, wall s) of the full run and (audio s, wall s) of the quarter run: the
    difference gives the job's steady-state rate apart from its fixed cost per run (catalog,
    actor start-up with model and codebook loading, the final commit).
    """
    from spear.cluster.ray_runtime import ray_session
    from spear.config import load_config
    from spear.pipeline.tokenize_job import run_tokenize

    cfg = load_config(None, base_sets + [f"output={out}", f"ray.num_cpus={cpus}",
                                         f"corpus.sources=[{{uri: {corpus_dir}, domain: audio}}]"])
    names = sorted(os.listdir(corpus_dir))

    def run(files, name):
        src = os.path.join(out, f"_{name}_in")
        os.makedirs(src)
        for f in files:
            os.symlink(os.path.join(corpus_dir, f), os.path.join(src, f))
        rcfg = cfg.model_copy(deep=True)
        rcfg.output = os.path.join(out, name)
        rcfg.corpus.sources[0].uri = src
        shutil.copytree(codebook_dir, os.path.join(rcfg.output, "codebooks"))
        t0 = time.perf_counter()
        s = run_tokenize(rcfg, progress=False)
        return s, time.perf_counter() - t0

    with ray_session(cfg.ray):
        run(names[:cpus], "warm")  # start workers and import the models once, as a long job would have
        full, wall = run(names, "full")
        part, part_wall = run(names[: max(cpus, len(names) // 4)], "quarter")
        return full, wall, part.audio_seconds, part_wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-tokenize"))
    args = ap.parse_args()

    from spear.cluster.ray_runtime import ray_session
    from spear.config import load_config
    from spear.pipeline.tokenize_job import run_tokenize

    corpus_dir = os.path.join(args.cache, f"corpus-{args.minutes:g}")
    paths = make_corpus(corpus_dir, args.minutes, file_seconds=30.0)
    work = tempfile.mkdtemp(prefix="spear-bench-tok-")
    base = ["decode.max_segment_seconds=30", "tokenize.commit_interval_s=30", "mvq.sample_frames=20000"]
    try:
        # pass 1 once: fit the codebooks on this corpus
        fit_out = os.path.join(work, "fit")
        cfg = load_config(None, base + [f"output={fit_out}", f"ray.num_cpus={args.cpus}",
                                        f"corpus.sources=[{{uri: {corpus_dir}, domain: audio}}]"])
        with ray_session(cfg.ray):
            fitted = run_tokenize(cfg, progress=False)
        codebook_dir = os.path.join(fit_out, "codebooks")

        t0 = time.perf_counter()
        loop_seconds = single_process_loop(paths, cfg, fitted.codebooks)
        loop_wall = time.perf_counter() - t0
        runs, steady, fixed, why = {}, {}, {}, {}
        for n in sorted({1, args.cpus}):
            s, wall, part_seconds, part_wall = ray_run(corpus_dir, os.path.join(work, f"run{n}"), codebook_dir, n, base)
            runs[n] = (s, wall)
            steady[n], fixed[n], why[n] = steady_state(s.audio_seconds, wall, part_seconds, part_wall)

        print(f"\ntokenize bench: {len(paths)} files, {loop_seconds / 60:.1f} min of audio, teachers mfcc + fbank, "
              f"{args.cpus} CPUs")
        print(f"{'path':44s} {'CPUs':>4s} {'wall s':>8s} {'x real time':>12s} {'audio h/h/CPU':>14s}")
        print(f"{'single-process loop (decode->teacher->encode)':44s} {1:4d} {loop_wall:8.2f} "
              f"{loop_seconds / loop_wall:12.1f} {loop_seconds / loop_wall:14.1f}")
        for n, (s, wall) in runs.items():
            print(f"{'Ray tokenize job (pass 2, shards committed)':44s} {n:4d} {wall:8.2f} "
                  f"{s.audio_seconds / wall:12.1f} {s.audio_seconds / wall / n:14.1f}")
        for n, rate in steady.items():
            if rate is None:
                print(f"{'  steady state (full run minus a quarter run)':44s} {n:4d} {why[n]}")
                continue
            print(f"{'  steady state (full run minus a quarter run)':44s} {n:4d} {'':8s} {rate:12.1f} {rate / n:14.1f}"
                  f"  (fixed cost per run {fixed[n]:.1f} s)")
        s1, w1 = runs[1]
        sn, wn = runs[args.cpus]
        loop_rate = loop_seconds / loop_wall
        steady_ratio = "not measurable" if steady[args.cpus] is None else f"{steady[args.cpus] / loop_rate:.2f}x"
        print(f"\nRay job on {args.cpus} CPUs / single-process loop: {(sn.audio_seconds / wn) / loop_rate:.2f}x end to end, "
              f"{steady_ratio} steady state")
        if args.cpus > 1:
            eff = (sn.audio_seconds / wn) / (args.cpus * s1.audio_seconds / w1)
            scaled = (f"{steady[args.cpus] / (args.cpus * steady[1]):.2f}" if None not in (steady[1], steady[args.cpus])
                      else "not measurable")
            print(f"scaling efficiency 1 -> {args.cpus} CPUs: {eff:.2f} end to end, {scaled} steady state")
        import pyarrow.compute as pc

        from spear.pipeline.ledger import TokenStore

        hours = sn.audio_seconds / 3600
        table = TokenStore(os.path.join(work, f"run{args.cpus}", "full"), sn.token_version).read_table(
            [f"{r}_tokens" for r in sn.codebooks])
        for role, cb in sn.codebooks.items():
            raw = int(pc.sum(pc.binary_length(table[f"{role}_tokens"])).as_py() or 0)  # frames x codebooks bytes
            stored = sn.token_bytes.get(role, 0)
            print(f"{role} tokens: {stored / hours / 1e6:.2f} MB per audio hour on disk vs raw uint8 "
                  f"{raw / hours / 1e6:.2f} MB/h -> {stored / raw:.3f}x (target <= 1.1x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
