"""Benchmark: `spear export-tokens` against Lhotse's own Shar writer on the same cuts, same run.

    python bench/export_tokens.py                 # the demo corpus (about an hour of audio), ~4 min on 2 CPUs
    python bench/export_tokens.py --corpus tiny   # 31 files, a smoke run

The demo corpus is tokenised once with the weight-free teachers (cached under --cache, shared with
bench/optim.py). Then, on the same token version:

- ``export lhotse-shar``: :func:`spear.pipeline.export_tokens.run_export_tokens` as the CLI runs it:
  the ledger's live rows read shard by shard, each row made a cut (FLAC recording in memory, one
  uint8 TemporalArray per teacher) and written by Lhotse's SharWriter;
- ``export lhotse-cuts``: the same rows as one CutSet manifest, the recordings and arrays as files;
- reference ``lhotse to_shar``: Lhotse's ``CutSet.to_shar`` writing the same cuts, built in memory
  before the clock starts: what writing Shar costs at all.

It prints cuts/s and audio seconds per second for each, and the ratio of each export to the
reference (1.0: the export costs only what Lhotse's writer does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["tiny", "demo"], default="demo")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="repeat each writer for at least this long")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-optim"))
    args = ap.parse_args()

    from lhotse import CutSet

    from common import timed

    from spear.cluster.ray_runtime import ray_session
    from spear.cluster.storage import Storage
    from spear.config import load_config
    from spear.pipeline.export_tokens import iter_live_rows, row_to_cut, run_export_tokens
    from spear.pipeline.ledger import list_token_versions, select_token_store
    from spear.schemas.lhotse_export import shar_fields
    from spear.schemas.shards import TEACHER_ROLES

    tokens = os.path.join(args.cache, f"tokens-{args.corpus}-0")
    cached = bool(list_token_versions(tokens, Storage()))
    with contextlib.nullcontext() if cached else ray_session(load_config(None).ray):
        import optim

        optim.tokenised(args.cache, args.corpus, 0, None)  # its cached demo-corpus tokens

    store = select_token_store(tokens, Storage(), None)
    teachers = {r: t for r, t in (store.version_info().get("teachers") or {}).items() if r in TEACHER_ROLES}
    cuts = CutSet.from_cuts(row_to_cut(row, teachers, store.version, row["segment_id"])
                            for row in iter_live_rows(store))
    seconds = sum(c.duration for c in cuts)
    print(f"export bench: {tokens} ({len(cuts)} cuts, {seconds / 60:.1f} min of audio, token version "
          f"{store.version}, teachers {', '.join(sorted(teachers))})", flush=True)

    work = tempfile.mkdtemp(prefix="spear-bench-export-")
    try:
        def fresh(name: str) -> str:
            path = os.path.join(work, name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)  # to_shar writes into an existing folder; the export takes a new or empty one
            return path

        rows = {}
        _, t_ref = timed(lambda: cuts.to_shar(fresh("reference"), fields=shar_fields(list(teachers)), shard_size=1000),
                         args.min_seconds)
        rows["reference: lhotse to_shar"] = t_ref
        for fmt in ("lhotse-shar", "lhotse-cuts"):
            summary, t = timed(lambda: run_export_tokens(tokens, fresh(fmt), fmt=fmt, progress=False),
                               args.min_seconds)
            assert summary.cuts == len(cuts), (summary.cuts, len(cuts))
            rows[f"export {fmt}"] = t
        print(f"{'writer':<28} {'cuts/s':>9} {'audio s/s':>10} {'ratio to reference':>19}")
        for name, t in rows.items():
            print(f"{name:<28} {len(cuts) / t:>9.1f} {seconds / t:>10.1f} {t_ref / t:>18.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
