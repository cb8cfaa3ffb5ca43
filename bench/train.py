"""Training input pipeline vs model step rate, and step time / memory per student size, one run.

    python bench/train.py                    # tokenises ~6 min of audio once (cached), then measures
    python bench/train.py --sizes tiny small base

(1) loader: batches/s of shard reading + FLAC decode + token mixing + fbank + masking + target
    alignment (spear.stages.train_data + spear.stages.train_loop.prepare_batch), one process;
(2) the tiny student's training step rate (forward + backward + AdamW) on the same batches;
    target: loader >= 5x the step rate, so it is never the bottleneck;
(3) step time and peak memory per model size: GPU memory where a GPU is present, else the peak
    resident-set growth over the steps (sampled every 2 ms, glibc heap trimmed between models).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import threading
import time

import torch

from common import make_corpus


def tokenised_shards(cache: str, minutes: float) -> str:
    """Token shards of a cached bench corpus (weight-free teachers), built once."""
    from spear.cluster.ray_runtime import ray_session
    from spear.config import load_config
    from spear.pipeline.ledger import list_token_versions
    from spear.cluster.storage import Storage
    from spear.pipeline.tokenize_job import run_tokenize

    corpus = os.path.join(cache, f"corpus-{minutes:g}")
    out = os.path.join(cache, f"tokens-{minutes:g}")
    if list_token_versions(out, Storage()):
        return out
    make_corpus(corpus, minutes, file_seconds=20.0)
    cfg = load_config(None, [f"output={out}", "decode.max_segment_seconds=10", "mvq.sample_frames=20000",
                             f"corpus.sources=[{{uri: {corpus}, domain: audio}}]"])
    with ray_session(cfg.ray):
        run_tokenize(cfg, progress=False)
    return out


def rss_mb() -> float:
    """The resident set now (not the process-lifetime peak, which would hide every model after the largest)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident-set growth over a block, sampled in a thread; frees the glibc heap first."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed by the previous model back to the OS
        except OSError:
            pass
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak - self.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-seconds", type=float, default=40.0)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"],
                    help="student sizes (tiny small base spear-large spear-600m)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-train"))
    args = ap.parse_args()

    from spear.cluster.storage import Storage
    from spear.models.device import default_device
    from spear.models.frontend import KaldiFbank
    from spear.config import TrainConfig
    from spear.pipeline.ledger import TokenStore, list_token_versions
    from spear.pipeline.train_job import plan_training_data
    from spear.stages.train_data import TrainBatches
    from spear.stages.train_loop import build_objective, prepare_batch

    shards = tokenised_shards(args.cache, args.minutes)
    st = Storage()
    store = TokenStore(shards, list_token_versions(shards, st)[0], st)
    plan = plan_training_data(store)
    device = default_device()
    cfg = TrainConfig(batch_seconds=args.batch_seconds)

    # (1) the input pipeline alone
    encoder_for_lengths = build_objective(cfg, plan).encoder
    fbank = KaldiFbank(num_mel_bins=128).to(device)
    gen = torch.Generator().manual_seed(0)
    loader = TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=args.batch_seconds, audio_weight=3.0, seed=0)
    raw, prepared, audio_s = [], [], 0.0
    t0 = time.perf_counter()
    for batch in loader:
        raw.append(batch)
        prepared.append(prepare_batch(batch, plan, cfg, encoder_for_lengths, fbank, gen, device))
        audio_s += prepared[-1][3]
        if len(prepared) == args.batches:
            break
    load_wall = time.perf_counter() - t0
    loader_rate = len(prepared) / load_wall

    # (2) + (3) training steps on the prepared batches
    print(f"\ntrain bench: {len(plan.files)} shards, {sum(plan.seconds_by_domain.values()) / 60:.1f} min of tokens, "
          f"batches of {args.batch_seconds:g} s padded audio, device {device}, {torch.get_num_threads()} threads")
    print(f"input pipeline: {loader_rate:.2f} batches/s ({audio_s / load_wall:.0f}x real time) over {len(prepared)} batches")
    print(f"\n{'model':24s} {'params':>9s} {'step s':>8s} {'steps/s':>8s} {'peak mem MB':>12s} {'loader / step rate':>19s}")
    for size in args.sizes:
        for arch in ("zipformer2", "transformer"):
            tcfg = TrainConfig(batch_seconds=args.batch_seconds, student={"architecture": arch, "size": size})
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss:  # model, optimiser state, activations and gradients
                model = build_objective(tcfg, plan).to(device)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                # targets aligned to this architecture's frame rate (untimed: the loader was measured above)
                n = min(len(raw), {"tiny": len(raw), "small": 6}.get(size, 3))
                batches = [prepare_batch(b, plan, tcfg, model.encoder, fbank, torch.Generator().manual_seed(0), device)
                           for b in raw[:n]]
                times = []
                for masked, feat_lens, targets, _ in batches:
                    t = time.perf_counter()
                    out = model(masked.feats, feat_lens, targets, frame_mask=masked.frame_mask)
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
            step = sum(times[1:]) / max(1, len(times) - 1)  # the first step pays one-off allocation
            mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.growth_mb
            params = sum(p.numel() for p in model.parameters())
            print(f"{arch + ' ' + size:24s} {params / 1e6:8.2f}M {step:8.3f} {1 / step:8.2f} {mem:12.0f} "
                  f"{loader_rate * step:18.1f}x", flush=True)
            del model, opt, batches, out
    print("\ntarget: loader / step rate >= 5x for the tiny model (the loader is then never the bottleneck)")


if __name__ == "__main__":
    main()
