"""ScaledAdam + Eden against AdamW + cosine: the masked-prediction loss after equal steps on demo shards.

    python bench/optim.py                          # tiny demo corpus, 300 steps per optimiser, ~10 min on 2 CPUs
    python bench/optim.py --steps 600 --corpus demo

The demo corpus (espeak-ng speech and procedural events, :mod:`spear.synthetic.corpus`) is
tokenised once with the weight-free teachers (MFCC speech, fbank audio; cached under --cache), and
a second corpus of the same size but another seed is tokenised with the same codebooks as the
held-out set. The same prepared batches (fbank, mixing off, masks fixed per batch) train a tiny
Zipformer2 student from the same initial weights with each optimiser, as ``spear train`` builds it
(:func:`spear.stages.train_loop.build_optimizer`, warm-up ``--warmup`` steps for both):

- ``scaled_adam``: the default, base lr 0.045, Eden with the SPEAR settings (lr_batches 7500,
  lr_hours 75000: flat after warm-up at this scale), its own median-based clipping;
- ``adamw``: AdamW at each ``--adamw-lr`` (the demo's 0.003 first), cosine decay to 10% at the last
  step, gradients clipped to norm 5.

It prints the curve of the training loss (the masked-prediction objective, mean per window of
steps), the held-out loss at a few points, the final held-out loss, speech CE and masked accuracy,
and each ratio ScaledAdam / AdamW (below 1: ScaledAdam is better).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import tempfile
import time

import numpy as np
import torch


def tokenised(cache: str, corpus_size: str, seed: int, reuse: str | None, name: str | None = None,
              shape: tuple[int, int, int] = (8, 4, 64)) -> str:
    """Token shards of the demo corpus of ``corpus_size`` and ``seed`` (cached), optionally with another run's codebooks."""
    from spear.cluster.storage import Storage
    from spear.config import SourceConfig, load_config
    from spear.pipeline.ledger import list_token_versions
    from spear.pipeline.tokenize_job import run_tokenize
    from spear.synthetic.corpus import generate_demo_corpus

    out = os.path.join(cache, name or f"tokens-{corpus_size}-{seed}")
    if list_token_versions(out, Storage()):
        return out
    corpus = generate_demo_corpus(os.path.join(cache, f"corpus-{corpus_size}-{seed}"), size=corpus_size, seed=seed)
    sets = [f"output={out}", f"mvq.speech_codebooks={shape[0]}", f"mvq.audio_codebooks={shape[1]}",
            f"mvq.codebook_size={shape[2]}",
            "mvq.sample_frames=4000", "decode.max_segment_seconds=10"]
    if reuse:
        sets.append(f"mvq.reuse_codebooks={reuse}")
    cfg = load_config(None, sets)
    cfg.corpus.sources = [SourceConfig(uri=str(corpus.speech_dir), domain="speech", name="demo-speech"),
                          SourceConfig(uri=str(corpus.audio_dir), domain="audio", name="demo-audio")]
    run_tokenize(cfg, progress=False)  # inside main's Ray session
    return out


def prepared_batches(shards: str, cfg, n: int, seed: int):
    """``n`` batches of the token dataset at ``shards``, prepared as the training loop does (the loader
    cycles through epochs), and its plan."""
    from spear.cluster.storage import Storage
    from spear.models.frontend import KaldiFbank
    from spear.pipeline.ledger import TokenStore, list_token_versions
    from spear.pipeline.train_job import plan_training_data
    from spear.stages.train_data import TrainBatches
    from spear.stages.train_loop import build_objective, prepare_batch

    st = Storage()
    plan = plan_training_data(TokenStore(shards, list_token_versions(shards, st)[0], st))
    encoder = build_objective(cfg, plan).encoder  # for the output lengths only
    fbank = KaldiFbank(num_mel_bins=cfg.student.num_mel_bins)
    gen = torch.Generator().manual_seed(seed)
    loader = TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=cfg.batch_seconds,
                          audio_weight=cfg.audio_weight, seed=seed)
    out = []
    for batch in loader:
        out.append(prepare_batch(batch, plan, cfg, encoder, fbank, gen, torch.device("cpu")))
        if len(out) == n:
            break
    return out, plan


def held_out_loss(objective, batches) -> dict[str, float]:
    objective.eval()
    tot: dict[str, float] = {}
    with torch.no_grad():
        for masked, lens, targets, _ in batches:
            m = objective(masked.feats, lens, targets, frame_mask=masked.frame_mask).metrics()
            for k in ("loss", "speech/ce", "speech/acc_masked", "audio/ce"):
                if k in m and np.isfinite(m[k]):
                    tot[k] = tot.get(k, 0.0) + m[k] / len(batches)
    objective.train()
    return tot


def train(kind: str, lr: float | None, args, plan, batches, evals, lr_batches: float | None = None) -> dict:
    from spear.config import TrainConfig
    from spear.stages.train_loop import build_objective, build_optimizer, eden_epoch_per_step

    sets = {"optimizer": kind, "batch_seconds": args.batch_seconds, "warmup_steps": args.warmup,
            "max_steps": args.steps, "mixing": {"prob": 0.0}, "student": {"size": "tiny"}}
    if lr is not None:
        sets["lr"] = lr
    if lr_batches is not None:
        sets["scaled_adam"] = {"lr_batches": lr_batches}
    cfg = TrainConfig.model_validate(sets)
    torch.manual_seed(args.seed)  # the same initial weights and dropout for every optimiser
    objective = build_objective(cfg, plan)
    optimizer, scheduler, _ = build_optimizer(objective, cfg, world=1, max_workers=1)
    per_step = eden_epoch_per_step(cfg, plan, 1)
    losses, curve = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        masked, lens, targets, _ = batches[step]
        out = objective(masked.feats, lens, targets, frame_mask=masked.frame_mask)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if kind == "adamw":
            torch.nn.utils.clip_grad_norm_(objective.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
        else:
            optimizer.step()
            scheduler.step(epoch=scheduler.epoch + per_step)
        losses.append(float(out.loss.detach()))
        if (step + 1) % max(1, args.steps // 5) == 0 or step + 1 == args.steps:
            curve.append((step + 1, held_out_loss(objective, evals)["loss"]))
    final = held_out_loss(objective, evals)
    print(f"  {kind}{'' if lr is None else f' lr={lr:g}'}{'' if lr_batches is None else f' lr_batches={lr_batches:g}'}: {args.steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"final held-out loss {final['loss']:.4f}", flush=True)
    return {"losses": losses, "held_out_curve": curve, "final": final, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-seconds", type=float, default=16.0)
    ap.add_argument("--warmup", type=int, default=30, help="warm-up steps of both schedules (the demo's 30)")
    ap.add_argument("--adamw-lr", type=float, nargs="+", default=[0.003, 0.01],
                    help="AdamW peak lrs to compare with (the demo's 0.003 first: the ratio is against it)")
    ap.add_argument("--sa-lr-batches", type=float, nargs="*", default=[],
                    help="extra ScaledAdam runs with Eden's lr_batches set to these (to decay within a short run)")
    ap.add_argument("--corpus", choices=["tiny", "demo"], default="tiny")
    ap.add_argument("--shards", help="train on this token dataset instead (a `spear demo` run's iter1/tokens); "
                    "the held-out set is then the tiny demo corpus of seed 1 tokenised with its codebooks")
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-optim"))
    args = ap.parse_args()

    from spear.cluster.ray_runtime import ray_session
    from spear.cluster.storage import Storage
    from spear.config import TrainConfig, load_config
    from spear.pipeline.ledger import list_token_versions

    t0 = time.perf_counter()
    if args.shards:
        names = {"eval": "held-out-" + hashlib.sha1(os.path.abspath(args.shards).encode()).hexdigest()[:10]}
    else:
        names = {"train": f"tokens-{args.corpus}-0", "eval": f"tokens-{args.corpus}-1"}
    cached = all(list_token_versions(os.path.join(args.cache, n), Storage()) for n in names.values())
    # one Ray start for both token datasets, none when both are cached
    with contextlib.nullcontext() if cached else ray_session(load_config(None).ray):
        train_shards = args.shards or tokenised(args.cache, args.corpus, 0, None)
        # a `spear demo` dataset has demo.yaml's codebook shape: the held-out set reuses its codebooks
        eval_shards = tokenised(args.cache, "tiny" if args.shards else args.corpus, 1, train_shards, names["eval"],
                                (16, 8, 256) if args.shards else (8, 4, 64))
    cfg = TrainConfig.model_validate({"batch_seconds": args.batch_seconds, "mixing": {"prob": 0.0},
                                      "student": {"size": "tiny"}})
    batches, plan = prepared_batches(train_shards, cfg, args.steps, args.seed)
    evals, _ = prepared_batches(eval_shards, cfg, args.eval_batches, args.seed + 1)
    hours = sum(plan.seconds_by_domain.values()) / 3600
    what = args.shards or f"demo corpus '{args.corpus}'"
    print(f"\noptimiser bench: {what} ({hours * 60:.1f} min of tokens; held out: another seed, "
          f"same codebooks), tiny Zipformer2, {args.steps} steps of {args.batch_seconds:g} s, warm-up {args.warmup}, "
          f"{torch.get_num_threads()} threads; data ready in {time.perf_counter() - t0:.0f} s", flush=True)

    runs = {"scaled_adam": train("scaled_adam", None, args, plan, batches, evals)}
    for lr in args.adamw_lr:
        runs[f"adamw lr={lr:g}"] = train("adamw", lr, args, plan, batches, evals)
    for lb in args.sa_lr_batches:
        runs[f"SA lr_batches={lb:g}"] = train("scaled_adam", None, args, plan, batches, evals, lr_batches=lb)
    names = list(runs)
    ref = names[1]

    w = max(1, args.steps // 10)
    print("\ntraining loss (masked-prediction objective), mean over steps:")
    print(f"{'steps':>10s} " + " ".join(f"{n:>16s}" for n in names) + f" {'ratio SA/' + ref.split()[0]:>16s}")
    for i in range(0, args.steps, w):
        means = [float(np.mean(runs[n]["losses"][i: i + w])) for n in names]
        print(f"{i + 1:>4d}-{min(i + w, args.steps):<5d} " + " ".join(f"{m:16.4f}" for m in means)
              + f" {means[0] / means[1]:16.3f}")
    print("\nheld-out loss:")
    for j, (step, _) in enumerate(runs[names[0]]["held_out_curve"]):
        vals = [runs[n]["held_out_curve"][j][1] for n in names]
        print(f"{'step ' + str(step):>10s} " + " ".join(f"{v:16.4f}" for v in vals) + f" {vals[0] / vals[1]:16.3f}")
    print("\nfinal, held out:")
    for k in ("loss", "speech/ce", "audio/ce", "speech/acc_masked"):
        vals = [runs[n]["final"].get(k, float("nan")) for n in names]
        print(f"{k:>18s} " + " ".join(f"{v:16.4f}" for v in vals) + f" {vals[0] / vals[1]:16.3f}")
    print(f"{'train s':>18s} " + " ".join(f"{runs[n]['seconds']:16.0f}" for n in names))
    r = runs[names[0]]["final"]["loss"] / runs[ref]["final"]["loss"]
    print(f"\nScaledAdam / AdamW (lr {ref.split('=')[1]}) final held-out loss: {r:.3f} "
          f"({'ScaledAdam better' if r < 1 else 'AdamW better'} at {args.steps} equal steps)")


if __name__ == "__main__":
    main()
