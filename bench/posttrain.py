"""Post-training input pipeline vs model step rate, one run.

    python bench/posttrain.py                       # the multilingual demo corpus (generated once, cached)
    python bench/posttrain.py --steps 30 --freeze full

(1) loader: batches/s of :class:`spear.stages.posttrain_batches.PostTrainBatches` (FLAC decode, random crops,
    speaker classes and semantic targets, and the synthetic counting clips generated on the fly), one process;
(2) the step rate of the demo's post-training on the same batches: a tiny Zipformer2 student with the speaker,
    semantic and counting heads (forward, AAM / alignment / counting losses, backward, AdamW);
the ratio (1) / (2) is the reference measured in the same run: the loader must stay well ahead of the step
(target >= 5x), since a worker does both in one process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-posttrain"))
    ap.add_argument("--batches", type=int, default=40, help="loader batches timed")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed (after 2 warm-up steps)")
    ap.add_argument("--freeze", default="full", choices=["frozen", "top", "full"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from spear.cluster.storage import Storage
    from spear.models.posttrain import pivot_text_embedding
    from spear.models.student import build_encoder
    from spear.pipeline.demo import demo_config
    from spear.stages.artefacts import export_student
    from spear.stages.posttrain_batches import PostTrainBatches, plan_posttrain
    from spear.stages.posttrain_data import decode_items, read_manifests
    from spear.stages.posttrain_loop import build_optimizer, build_posttrain_model
    from spear.synthetic.counting import CountingGenerator
    from spear.synthetic.multilingual import generate_multilingual_corpus

    storage = Storage()
    corpus = generate_multilingual_corpus(os.path.join(args.cache, "corpus"), size="demo")
    items, _, _ = read_manifests([str(corpus.train_manifest)], [], storage)
    t0 = time.perf_counter()
    table, _ = decode_items(items, storage)
    print(f"prepared {table.num_rows} training utterances in {time.perf_counter() - t0:.1f} s (one process)")
    cfg = demo_config(None, (f"posttrain.freeze={args.freeze}",)).posttrain
    plan = plan_posttrain(table, cfg.attributes, clip_seconds=cfg.counting_clip_seconds,
                          targets=lambda texts, a: pivot_text_embedding(list(texts), a.dim).numpy(),
                          counting_generator=CountingGenerator)
    student_dir = os.path.join(args.cache, "student")
    if not os.path.isfile(os.path.join(student_dir, "config.json")):
        torch.manual_seed(0)
        export_student(build_encoder("zipformer2", "tiny"), student_dir)

    def loader() -> PostTrainBatches:
        return PostTrainBatches(table, plan, rank=0, world_size=1, batch_size=cfg.batch_size,
                                max_seconds=cfg.max_seconds, seed=0)

    batches = loader()
    t0 = time.perf_counter()
    kept = [batches.next_batch()[0] for _ in range(args.batches)]
    load_s = (time.perf_counter() - t0) / args.batches
    audio_s = sum(float(b.lengths.sum()) for b in kept) / 16000 / len(kept)

    model = build_posttrain_model(student_dir, plan.specs(), cfg, storage)
    model.train()
    optimizer, _, _ = build_optimizer(model, cfg)
    step_times = []
    for i in range(args.steps + 2):
        batch = kept[i % len(kept)]
        t0 = time.perf_counter()
        res = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        res.loss.backward()
        optimizer.step()
        if i >= 2:
            step_times.append(time.perf_counter() - t0)
    step_s = sum(step_times) / len(step_times)
    print(f"batch: {cfg.batch_size} utterances, {audio_s:.1f} s of audio on average (counting share "
          f"{cfg.attributes[-1].sample_weight / sum(a.sample_weight for a in cfg.attributes):.2f})")
    print(f"(1) loader: {1 / load_s:.2f} batches/s ({cfg.batch_size / load_s:.0f} utterances/s, "
          f"{audio_s / load_s:.0f}x real time), one process")
    print(f"(2) post-training step (freeze={args.freeze}, {args.threads} threads): {step_s:.3f} s per batch "
          f"({cfg.batch_size / step_s:.0f} utterances/s, {audio_s / step_s:.0f}x real time)")
    print(f"loader / step rate: {step_s / load_s:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
