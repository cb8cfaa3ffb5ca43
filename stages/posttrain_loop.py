"""The post-training Ray Train loop: one function that every worker runs (Train V2, DDP; gloo on CPUs).

Per step: a batch of labelled utterances and synthetic counting clips
(:class:`~spear.stages.posttrain_batches.PostTrainBatches`) -> the input student with one head per
attribute (:class:`~spear.models.posttrain.PostTrainModel`: ``posttrain.freeze``, ``trainable_layers``,
``input_layer``) -> each attribute's loss on its rows (the speaker margin warmed up over
``margin_warmup_steps``) -> AdamW with two parameter groups (heads at ``head_lr``, the trainable
encoder layers at ``encoder_lr``), gradients clipped to norm 5, linear warm-up then cosine decay
(:func:`~spear.stages.train_loop.lr_lambda`). Every ``checkpoint_every`` steps rank 0 writes a
checkpoint as pre-training does (:func:`~spear.stages.train_loop.save_checkpoint`: model, optimiser,
scheduler, every rank's data position, batch RNG and dropout RNG, the world sizes, the metrics so far
with each attribute's loss, rows and accuracy), plus the attribute specs and the input model, so that
the job can export from it without the data (:func:`load_posttrain_checkpoint`).

Restarts (a re-run into the same output, a failed worker, an elastic resize) restore all of it:
at the same world size each rank continues exactly where it was; at another, the ranks' consumed
positions are merged (:func:`~spear.stages.train_data.resume_state`). The learning rates do not
depend on the world size (each worker's batch holds ``batch_size`` rows). Failures that a retry
cannot fix raise :class:`~spear.stages.train_loop.NonRetryableError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
import time
from typing import Any, Optional

import torch
from torch import nn

from spear.cluster.storage import Storage, cached_storage, join_uri
from spear.config import PostTrainConfig
from spear.models.posttrain import AttributeSpec, PostTrainModel, margin_warmup
from spear.stages.artefacts import load_any_student
from spear.stages.audio import AudioDecodeError
from spear.stages.posttrain_batches import COLUMNS, PostTrainBatches, PostTrainDataError, PostTrainPlan
from spear.stages.posttrain_data import read_prepared
from spear.stages.train_data import resume_state
from spear.stages.train_loop import (MODEL_FILE, PROGRESS_EVERY, STATE_FILE, NonRetryableError,
                                     collective_timeout_ends_run, cpu_worker_threads, first_line, gather_data_states,
                                     lr_lambda, progress_line, quiet_report_lines, random_state, record_group_start,
                                     restore_checkpoint, resume_checkpoint, resume_random, save_checkpoint)


class _LossForward(nn.Module):
    """The model's loss as ``forward``: DDP synchronises gradients only of what runs through its forward."""

    def __init__(self, model: PostTrainModel):
        super().__init__()
        self.model = model

    def forward(self, batch, margins):
        return self.model.loss(batch, margins)


def build_posttrain_model(model_uri: str, specs: list[AttributeSpec], cfg: PostTrainConfig,
                          storage: Optional[Storage] = None, device: Any = "cpu") -> PostTrainModel:
    """The input student at ``model_uri`` (a spear export or a released SPEAR model) with fresh heads for
    ``specs``, frozen as ``cfg`` says (the heads' initial weights follow ``torch``'s current seed)."""
    student = load_any_student(model_uri, storage, device=device)
    return PostTrainModel(student, specs, freeze=cfg.freeze, trainable_layers=cfg.trainable_layers,
                          input_layer=cfg.input_layer).to(device)


def build_optimizer(model: PostTrainModel, cfg: PostTrainConfig):
    """``(AdamW, LambdaLR, peak lr per group)``: heads at ``head_lr``, the trainable encoder at ``encoder_lr``."""
    groups = model.param_groups(head_lr=cfg.head_lr, encoder_lr=cfg.encoder_lr)
    lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    return optimizer, scheduler, lrs


def load_posttrain_checkpoint(checkpoint: str, storage: Storage, device: Any = "cpu"
                              ) -> tuple[PostTrainModel, dict[str, Any]]:
    """(the post-trained model of a checkpoint folder, in eval mode; its state JSON). The input model is
    read again from the URI the checkpoint names; the checkpoint holds every weight (encoder and heads)."""
    state = json.loads(storage.read_text(join_uri(checkpoint, STATE_FILE)))
    cfg = PostTrainConfig.model_validate(state["posttrain"])
    specs = [AttributeSpec.from_dict(s) for s in state["specs"]]
    model = build_posttrain_model(state["model"], specs, cfg, storage, device)
    weights = torch.load(io.BytesIO(storage.read_bytes(join_uri(checkpoint, MODEL_FILE))), map_location=device,
                         weights_only=True)
    model.load_state_dict(weights)
    return model.eval(), state


#: Rank 0 prints a progress line every this many steps (Ray forwards it to the driver's terminal).
def posttrain_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` = {"posttrain": PostTrainConfig dict, "plan": PostTrainPlan,
    "train_uri": the prepared training table, "model": the input model's URI, "storage_options",
    "events_uri", "resume_from": (step, URI) of the newest checkpoint on storage or None}."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan: PostTrainPlan = config["plan"]
    storage = cached_storage(config.get("storage_options"))
    cfg = PostTrainConfig.model_validate(config["posttrain"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_worker_threads(ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)  # the same fresh heads on every rank
    try:  # the same inputs on every rank: all fail alike, none waits for another
        specs = plan.specs()
        model = build_posttrain_model(config["model"], specs, cfg, storage, device)
    except (ValueError, FileNotFoundError) as exc:
        raise NonRetryableError(f"posttrain.model {config['model']}: {first_line(exc)}") from None
    try:
        table = read_prepared(config["train_uri"], storage, columns=COLUMNS)
    except (ValueError, FileNotFoundError) as exc:
        raise NonRetryableError(f"the prepared training table {config['train_uri']}: {first_line(exc)}") from None
    optimizer, scheduler, lrs = build_optimizer(model, cfg)
    start = restore_checkpoint(resume_checkpoint(config.get("resume_from"), config.get("storage_options")),
                               model, optimizer, scheduler, lrs, "adamw")
    step, metrics_rows = start.step, start.metrics_rows
    world_sizes = start.world_sizes if start.world_sizes and start.world_sizes[-1] == world else start.world_sizes + [world]
    resume_random(start, rank, world, cfg.seed, device)  # the trainable layers' dropout continues
    if rank == 0:
        record_group_start(config, world, start.resumed_from)

    loader = PostTrainBatches(table, plan, rank=rank, world_size=world, batch_size=cfg.batch_size,
                              max_seconds=cfg.max_seconds, seed=cfg.seed,
                              state=resume_state(start.rank_states or [], rank, world), step=step)
    ddp = ray.train.torch.prepare_model(_LossForward(model))
    ddp.train()
    speakers = [a for a in cfg.attributes if a.kind == "speaker"]
    params = [p for p in model.parameters() if p.requires_grad]
    t_last = time.monotonic()
    while step < cfg.max_steps:
        try:
            batch, ids = loader.next_batch()
        except (PostTrainDataError, AudioDecodeError) as exc:
            raise NonRetryableError(f"rank {rank}: {first_line(exc)}") from None
        margins = {a.name: margin_warmup(step, a.margin, a.margin_warmup_steps) for a in speakers}
        res = ddp(batch, margins)
        optimizer.zero_grad(set_to_none=True)
        with collective_timeout_ends_run(rank, world, cfg.collective_timeout_s,
                                         f"in the gradient all-reduce of step {step + 1}"):
            res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        now = time.monotonic()
        lr = scheduler.get_last_lr()
        metrics_rows.append({
            "step": step, "world_size": world, "lr": lr[0], "encoder_lr": lr[1] if len(lr) > 1 else 0.0,
            "utterances_per_s": len(ids) / max(now - t_last, 1e-9),
            # which rows this step trained on (rank 0's batch): audits resume and reproducibility
            "batch_digest": hashlib.sha1("|".join(ids).encode()).hexdigest()[:16], **res.metrics()})
        t_last = now
        if rank == 0 and (step % PROGRESS_EVERY == 0 or step >= cfg.max_steps):
            # to the process's own stderr, which Ray forwards once to the driver's stderr (progress never mixes with
            # the summary on stdout): Ray Train's patched print() would both tee it and log it (every line twice)
            since = metrics_rows[-(step % PROGRESS_EVERY or PROGRESS_EVERY):]
            print(progress_line(since, step, cfg.max_steps, label="posttrain", accuracies="/acc",
                                rate=("utterances_per_s", "utterances/s")), file=sys.__stderr__, flush=True)
        if step % cfg.checkpoint_every == 0 or step >= cfg.max_steps:
            all_states, random_states = gather_data_states(loader, rank, world, step, cfg.collective_timeout_s,
                                                           random_state(device))
            metrics = {"step": step, "loss": float(res.loss.detach()), "world_size": world}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(d, objective=model, optimizer=optimizer, scheduler=scheduler,
                                    metrics_rows=metrics_rows, kind="adamw",
                                    state={"step": step, "data_states": all_states, "random_states": random_states,
                                           "world_sizes": world_sizes,
                                           "resumed_from": start.resumed_from, "model": config["model"],
                                           "specs": [s.to_dict() for s in specs], "info": plan.info(),
                                           "posttrain": config["posttrain"]})
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics, checkpoint=None)
            t_last = time.monotonic()
