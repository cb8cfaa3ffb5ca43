"""Listing and planning a large Lhotse CutSet manifest, without loading audio, against Lhotse's own lazy iteration.

    python bench/lhotse_manifest.py                  # 1,000,000 cuts, 1 round
    python bench/lhotse_manifest.py --cuts 20000 --rounds 3

A ``cuts.jsonl.gz`` of N cuts is generated once with Lhotse's own writer into --cache (not
timed): long recordings (one hour each, 1000 cuts of 3.6 s apiece) whose paths alternate
between two real FLAC files and files that do not exist (listing never opens audio). Beside it,
a token output whose ledger already holds the first half of the cuts as tokenised (committed
through ``TokenStore``), so the diff has real work: half the cuts are new.

Each measured run is a fresh process (peak memory is a process-wide high-water mark), timed
from inside after its imports:

  (1) reference: ``CutSet.from_jsonl_lazy(manifest)``, iterating every cut (Lhotse's cheapest
      full pass over a manifest);
  (2) spear: what ``spear tokenize`` does before Ray starts: ``build_catalog`` on a
      ``SourceConfig`` naming the manifest (one catalog row per cut), the token version's
      ``ledger()``, ``diff_catalog`` (what is new) and ``plan_cut_blocks`` (the decode tasks).

For each: wall seconds, cuts per second, peak RSS and peak RSS above the process after its
imports (VmHWM); then (2)/(1) for time and for memory above imports. The variants run in
turn (A B A B ...) so a drift in the machine's speed hits both; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


CUTS_PER_RECORDING = 1000
CUT_SECONDS = 3.6
VERSION = "tv-bench-manifest"


def _maxrss_mb() -> float:
    """Peak resident memory of this process so far, MB: VmHWM, which starts afresh at exec (ru_maxrss keeps the
    parent's high-water mark across fork + exec on Linux, so a child would inherit this script's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ----------------------------------------------------------------------------- fixtures (not timed)


def make_manifest(cache: str, n: int) -> str:
    """cache/cuts-<n>.jsonl.gz, written once by Lhotse's CutSet writer."""
    import numpy as np
    import soundfile as sf
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
    from lhotse.audio import AudioSource

    path = os.path.join(cache, f"cuts-{n}.jsonl.gz")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    real = []
    for i in range(2):
        p = os.path.join(cache, f"real-{i}.flac")
        t = np.arange(16000) / 16000
        sf.write(p, (0.1 * np.sin(2 * np.pi * (300 + 200 * i) * t)).astype(np.float32), 16000)
        real.append(p)
    t0 = time.perf_counter()
    tmp = path + ".tmp.jsonl.gz"
    with CutSet.open_writer(tmp) as w:
        for i in range(n):
            r = i // CUTS_PER_RECORDING
            audio = real[r % 2] if r % 4 < 2 else os.path.join(cache, f"missing-{r}.flac")
            rec = Recording(id=f"rec-{r:06d}", sources=[AudioSource(type="file", channels=[0], source=audio)],
                            sampling_rate=16000, num_samples=int(3600 * 16000), duration=3600.0)
            start = (i % CUTS_PER_RECORDING) * CUT_SECONDS
            cid = f"rec-{r:06d}-{i % CUTS_PER_RECORDING:04d}"
            sup = SupervisionSegment(id=cid, recording_id=rec.id, start=0.0, duration=CUT_SECONDS, channel=0,
                                     text=f"utterance {i}", speaker=f"spk-{r % 97}", language="en")
            w.write(MonoCut(id=cid, start=start, duration=CUT_SECONDS, channel=0, recording=rec, supervisions=[sup]))
    os.replace(tmp, path)
    print(f"generated {n} cuts in {time.perf_counter() - t0:.1f} s: {path} ({os.path.getsize(path) / 1e6:.1f} MB)",
          file=sys.stderr)
    return path


def make_ledger(cache: str, n: int, manifest: str) -> str:
    """A token output whose ledger holds the first half of the manifest's cuts as tokenised."""
    import pyarrow.compute as pc

    from spear.cluster.storage import Storage
    from spear.config import SourceConfig
    from spear.pipeline.ledger import TokenStore
    from spear.stages.catalog import build_catalog

    out = os.path.join(cache, f"out-{n}")
    store = TokenStore(out, VERSION, Storage())
    if store.latest_manifest() is not None:
        return out
    objects = build_catalog([SourceConfig(uri=manifest, domain="speech", name="bench")]).objects
    half = objects.slice(0, objects.num_rows // 2)
    n_half = half.num_rows
    rows = {"source_uri": half["uri"], "source": half["source"], "domain": half["domain"], "etag": half["etag"],
            "size": half["size"], "run_id": ["run-bench"] * n_half, "status": ["tokenized"] * n_half,
            "segments": [1] * n_half, "audio_seconds": pc.cast(half["cut_duration"], "double"),
            "reason": [None] * n_half}
    store.commit("run-bench", [], [dict(zip(rows, vals)) for vals in zip(*[_pylist(v) for v in rows.values()])])
    return out


def _pylist(v):
    return v.to_pylist() if hasattr(v, "to_pylist") else v


# ----------------------------------------------------------------------------- measured children


def child(kind: str, manifest: str, out: str) -> dict:
    # both variants import the same modules before the baseline: their peaks compare as they are
    import lhotse  # noqa: F401
    import spear.pipeline.tokenize_job  # noqa: F401
    import spear.stages.catalog  # noqa: F401

    if kind == "lhotse":
        from lhotse import CutSet

        base = _maxrss_mb()
        t0 = time.perf_counter()
        n, seconds = 0, 0.0
        for cut in CutSet.from_jsonl_lazy(manifest):
            n += 1
            seconds += cut.duration
        wall = time.perf_counter() - t0
        return {"kind": kind, "wall": wall, "cuts": n, "seconds": seconds, "rss_base": base, "rss_peak": _maxrss_mb()}

    from spear.cluster.storage import Storage
    from spear.config import DecodeConfig, SourceConfig
    from spear.pipeline.ledger import TokenStore
    from spear.pipeline.tokenize_job import diff_catalog
    from spear.stages.catalog import build_catalog
    from spear.stages.lhotse_source import plan_cut_blocks

    storage = Storage()
    base = _maxrss_mb()
    t0 = time.perf_counter()
    catalog = build_catalog([SourceConfig(uri=manifest, domain="speech", name="bench")], storage)
    t_list = time.perf_counter() - t0
    ledger = TokenStore(out, VERSION, storage).ledger()
    t_ledger = time.perf_counter() - t0 - t_list
    todo, skipped = diff_catalog(catalog.objects, ledger)
    t_diff = time.perf_counter() - t0 - t_list - t_ledger
    blocks = plan_cut_blocks(todo, objects_per_task=DecodeConfig().objects_per_task, min_blocks=64)
    wall = time.perf_counter() - t0
    return {"kind": kind, "wall": wall, "list_wall": t_list, "ledger_wall": t_ledger, "diff_wall": t_diff,
            "plan_wall": wall - t_list - t_ledger - t_diff, "cuts": catalog.objects.num_rows, "new": todo.num_rows,
            "skipped": skipped, "blocks": len(blocks), "quarantined": len(catalog.unreadable),
            "rss_base": base, "rss_peak": _maxrss_mb()}


def run_child(kind: str, manifest: str, out: str) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--manifest", manifest,
                        "--output", out], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=1_000_000, help="cuts in the generated manifest")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each variant (alternating)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-lhotse-manifest"))
    ap.add_argument("--child", choices=["lhotse", "spear"], help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.manifest, args.output)))
        return

    manifest = make_manifest(args.cache, args.cuts)
    out = make_ledger(args.cache, args.cuts, manifest)
    results: dict[str, list[dict]] = {"lhotse": [], "spear": []}
    for _ in range(args.rounds):
        for kind in ("lhotse", "spear"):
            results[kind].append(run_child(kind, manifest, out))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    print(f"\nmanifest: {args.cuts} cuts, {os.path.getsize(manifest) / 1e6:.1f} MB gzip JSONL; ledger: first half "
          f"tokenised; {args.rounds} round(s), medians")
    names = {"lhotse": "(1) reference: CutSet.from_jsonl_lazy, every cut",
             "spear": "(2) spear: build_catalog + ledger + diff_catalog + plan_cut_blocks"}
    for kind in ("lhotse", "spear"):
        wall, peak, base = med(kind, "wall"), med(kind, "rss_peak"), med(kind, "rss_base")
        print(f"{names[kind]}\n    {wall:8.2f} s  {med(kind, 'cuts') / wall:10.0f} cuts/s  peak RSS {peak:7.0f} MB  "
              f"({peak - base:7.0f} MB above its imports)")
    s = results["spear"][-1]
    print(f"    spear, of it: listing {med('spear', 'list_wall'):.2f} s, ledger {med('spear', 'ledger_wall'):.2f} s, "
          f"diff {med('spear', 'diff_wall'):.2f} s, decode plan {med('spear', 'plan_wall'):.2f} s; {s['cuts']} cuts "
          f"listed, {s['new']} new, {s['skipped']} already tokenised, {s['blocks']} decode tasks, "
          f"{s['quarantined']} set aside")
    t_ratio = med("spear", "wall") / med("lhotse", "wall")
    m_ratio = med("spear", "rss_peak") / med("lhotse", "rss_peak")
    print(f"\nspear / Lhotse lazy iteration: time {t_ratio:.2f}x, peak RSS {m_ratio:.2f}x (same imports in both; "
          f"above them: {med('spear', 'rss_peak') - med('spear', 'rss_base'):.0f} MB vs "
          f"{med('lhotse', 'rss_peak') - med('lhotse', 'rss_base'):.0f} MB)")


if __name__ == "__main__":
    main()
