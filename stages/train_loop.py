"""The Ray Train loop: one function that every training worker runs (Train V2, DDP).

Per step: a duration batch of live shard rows (:mod:`spear.stages.train_data`) -> token mixing
on the waveforms and targets -> 128-bin Kaldi fbank -> span + channel masking -> student ->
per-teacher heads -> asymmetric multi-codebook cross-entropy -> the optimiser (``train.optimizer``:
ScaledAdam + Eden by default for Zipformer2, AdamW + cosine decay otherwise: :func:`build_optimizer`). Every
``checkpoint_every`` steps rank 0 writes a checkpoint with the model, optimiser, scheduler, step,
every rank's data position and random streams (dropout, masks: :func:`random_state`), the world
sizes seen and the metrics so far, and reports it.

Restarts (a re-run with the same output, a failed worker, an elastic resize) restore all of it;
after a resize each rank's data position comes from the merged positions
(:func:`~spear.stages.train_data.resume_state`) and the learning rate is scaled linearly with the
world size for AdamW: ``lr = train.lr * world_size / max_workers`` (each worker keeps its own
``batch_seconds``, so the effective batch grows with the world size). ScaledAdam's base lr is the same
for every world size (its steps are relative to each tensor's size; the authors use 0.045 on any number
of GPUs); Eden's epoch term counts the audio of the effective batch (:func:`eden_epoch_per_step`).

Ending together: before every step the ranks exchange whether each has a batch (one small
all-reduce), so a rank that runs out of rows stops every rank at the same step with an error
that names it, instead of leaving the others in DDP's gradient all-reduce forever. A collective
that waits longer than ``train.collective_timeout_s`` (the process group's timeout) ends the run
with one line naming the rank. Failures that a retry cannot fix (a missing or corrupt shard, an
unreadable checkpoint, a bad config) raise :class:`NonRetryableError`; the training job stops
Ray Train's retries on it (:mod:`spear.pipeline.train_job`).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from spear.cluster.storage import cached_storage, join_uri
from spear.config import TrainConfig
from spear.models.device import process_cpus
from spear.models.frontend import KaldiFbank
from spear.models.optim import Eden, ScaledAdam
from spear.models.student import (IGNORE_INDEX, SpearObjective, align_targets, build_encoder, has_any_target,
                                  mask_features, mix_batch, student_codebooks)
from spear.schemas.checkpoint import (FILE_SIZES_KEY, MODEL_FILE, OPTIM_FILE, STATE_FILE, incomplete_reason,
                                     parse_state)
from spear.schemas.segments import SAMPLE_RATE
from spear.schemas.train_metrics import METRICS_FILE
from spear.stages.artefacts import initialise_encoder
from spear.stages.audio import AudioDecodeError
from spear.stages.train_data import TrainBatches, TrainDataError, resume_state


class NonRetryableError(RuntimeError):
    """A training failure that a restart from the latest checkpoint cannot fix; the message is one line."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (tracebacks and multi-line library messages go to the log)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    name = type(exc).__name__
    if name.islower():  # struct.error, zlib.error: the bare name says nothing
        name = f"{type(exc).__module__}.{name}"
    return f"{name}: {lines[0] if lines else ''}".rstrip(": ")


def is_collective_timeout(exc: BaseException) -> bool:
    # gloo: "Timed out waiting 30000ms for recv operation"; NCCL/c10d: "... timeout ..."
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


@contextlib.contextmanager
def collective_timeout_ends_run(rank: int, world: int, timeout_s: float, waiting_for: str) -> Iterator[None]:
    """A collective inside the block that times out ends the run (no restart can help) with one line
    naming the rank and what it waited for."""
    try:
        yield
    except RuntimeError as exc:
        if is_collective_timeout(exc):
            raise NonRetryableError(f"rank {rank} of {world} waited more than {timeout_s:g} s "
                                    f"(train.collective_timeout_s) {waiting_for}: {first_line(exc)}") from None
        raise


# What a rank brings to a step. A step updates the model only if some rank's batch has a target of the
# student's teachers: an audio-only student's all-speech batch has none, and an AdamW step on zero
# gradients would still move every weight (momentum and weight decay).
HAS_TARGETS, NO_TARGETS, NO_BATCH = 0, 1, 2


def agree_step(state: int, rank: int, world: int, device, step: int, timeout_s: float) -> list[int]:
    """Every rank's state for this step (HAS_TARGETS, NO_TARGETS or NO_BATCH), by one all-reduce
    before the forward pass, so no rank waits forever in a collective the others never join; the
    same list on every rank.

    >>> agree_step(NO_TARGETS, rank=0, world=1, device="cpu", step=0, timeout_s=1.0)
    [1]
    """
    if world == 1:
        return [state]
    states = torch.zeros(world, dtype=torch.int64, device=device)
    states[rank] = state
    with collective_timeout_ends_run(rank, world, timeout_s, f"for the other workers before step {step + 1}"):
        torch.distributed.all_reduce(states)
    return [int(x) for x in states.tolist()]


def apply_update(model, optimizer, scheduler, kind: str, epoch_per_step: float, update: bool) -> None:
    """One optimiser step after ``backward()`` (AdamW clipped at 5, ScaledAdam clipping by itself), or none
    when ``update`` is False (no rank had a target). The learning-rate schedule advances either way: it
    counts steps (AdamW) or audio seen (Eden), and the batch was consumed."""
    if update:
        if kind == "adamw":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    if kind == "adamw":
        with warnings.catch_warnings():
            # a first step with no update: torch warns that the schedule's first value is skipped, as intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
    else:
        scheduler.step(epoch=scheduler.epoch + epoch_per_step)


def cpu_worker_threads(local_workers: int, cpus: Optional[int] = None) -> int:
    """Torch threads for a training worker on CPU: the node's CPUs shared among its workers.

    Ray starts a worker that reserves less than one CPU (``train.cpus_per_worker``, 0.5 by
    default, leaving room for data loading) with ``OMP_NUM_THREADS=1``, so without this a CPU
    run trains on one core whatever the machine has. ``cpus``: the CPUs this process may run on
    (default: its affinity).

    >>> cpu_worker_threads(1, cpus=2), cpu_worker_threads(2, cpus=2), cpu_worker_threads(3, cpus=16)
    (2, 1, 5)
    """
    if cpus is None:
        cpus = process_cpus()
    return max(1, int(cpus) // max(1, int(local_workers)))


def lr_lambda(warmup: int, max_steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak (a multiplier for LambdaLR)."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(objective, cfg: TrainConfig, world: int, max_workers: int):
    """``(optimizer, scheduler, lr)`` for ``cfg.optimizer_kind``; ``lr`` is AdamW's peak or ScaledAdam's base lr.

    adamw: AdamW (betas 0.9/0.98, weight decay 0.01) at ``train.lr * world / max_workers``, linear
    warm-up over ``warmup_steps`` then cosine decay to 10% at ``max_steps``; gradients are clipped to
    norm 5 by the loop. scaled_adam: ScaledAdam with its own median-based clipping and Eden at
    ``train.scaled_adam.base_lr``, warm-up over ``warmup_steps``; :meth:`Eden.step` takes the epoch
    from :func:`eden_epoch_per_step`.
    """
    if cfg.optimizer_kind == "adamw":
        lr = cfg.lr * world / max(1, max_workers)
        optimizer = torch.optim.AdamW(objective.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps)), lr
    sa = cfg.scaled_adam
    optimizer = ScaledAdam(objective.parameters(), lr=sa.base_lr, clipping_scale=sa.clipping_scale)
    scheduler = Eden(optimizer, lr_batches=sa.lr_batches, lr_epochs=sa.lr_hours if sa.lr_hours > 0 else sa.lr_epochs,
                     warmup_batches=cfg.warmup_steps, warmup_start=sa.warmup_start)
    return optimizer, scheduler, sa.base_lr


def eden_epoch_per_step(cfg: TrainConfig, plan, world: int) -> float:
    """How far one step moves Eden's epoch term: the step's nominal audio (``world * batch_seconds``, as
    icefall counts ``max_duration * world_size``; the same number on every rank, so every rank keeps the
    same lr) in hours when ``lr_hours`` > 0, else as a share of the token dataset's live audio (passes).
    The epoch itself is kept in the scheduler's state, so a resumed run, even at another world size,
    continues from the audio actually trained on."""
    seconds = world * cfg.batch_seconds
    if cfg.scaled_adam.lr_hours > 0:
        return seconds / 3600.0
    return seconds / max(1e-9, float(sum(plan.seconds_by_domain.values())))


def autocast_settings(device: torch.device, precision: str) -> dict[str, Any]:
    """``torch.autocast`` arguments for the student's forward pass: bf16 on a CUDA device when
    ``train.precision`` is bf16, otherwise disabled (CPU workers compute in float32).

    >>> autocast_settings(torch.device("cuda", 0), "bf16")["enabled"], autocast_settings(torch.device("cpu"), "bf16")["enabled"]
    (True, False)
    """
    return {"device_type": device.type, "dtype": torch.bfloat16,
            "enabled": device.type == "cuda" and precision == "bf16"}


def build_objective(train_cfg, plan):
    """The student encoder and its heads for the teachers of ``plan`` (no Ray: also used by export/tests)."""
    s = train_cfg.student
    encoder = build_encoder(s)  # architecture, size, num_mel_bins and frame_rate of the StudentConfig
    heads = {role: student_codebooks(plan.codebooks[role], plan.frame_rates[role], encoder.frame_rate)
             for role in plan.roles}
    weights = {"speech": 1.0, "audio": train_cfg.audio_loss_weight}
    return SpearObjective(encoder, heads, {r: weights[r] for r in plan.roles})


def heads_info(plan) -> dict[str, Any]:
    """What the prediction heads were built for (kept in checkpoints, so export needs no shards)."""
    return {"roles": list(plan.roles), "codebooks": dict(plan.codebooks), "frame_rates": dict(plan.frame_rates)}


def prepare_batch(batch: dict[str, np.ndarray], plan, train_cfg, encoder, fbank, generator: torch.Generator,
                  device: torch.device):
    """Collated arrays -> (fbank feats, frame lengths, frame mask, aligned targets, audio seconds)."""
    wavs = torch.from_numpy(batch["wavs"])
    wav_lens = torch.from_numpy(batch["wav_lens"])
    targets = {r: torch.from_numpy(batch[f"{r}_tokens"]) for r in plan.roles}
    domains = ["audio" if d else "speech" for d in batch["domains"].tolist()]
    if train_cfg.mixing.prob > 0 and wavs.shape[0] > 1:
        wavs, targets, _ = mix_batch(wavs, wav_lens, targets, plan.frame_rates, domains, generator,
                                     target_lengths={r: torch.from_numpy(batch[f"{r}_lens"]) for r in plan.roles},
                                     **train_cfg.mixing.model_dump())
    feats, feat_lens = fbank(wavs.to(device), wav_lens.to(device))
    masked = mask_features(feats, feat_lens, generator=generator, **train_cfg.masking.model_dump())
    student_lens = encoder.output_lengths(feat_lens).cpu()
    aligned = {r: align_role_targets(targets[r], torch.from_numpy(batch[f"{r}_lens"]), plan.frame_rates[r],
                                     encoder.frame_rate, student_lens).to(device) for r in plan.roles}
    return masked, feat_lens, aligned, float(batch["wav_lens"].sum()) / SAMPLE_RATE


def align_role_targets(tokens: torch.Tensor, token_lens: torch.Tensor, teacher_rate: float, student_rate: float,
                       student_lens: torch.Tensor) -> torch.Tensor:
    """align_targets for the utterances that have this teacher's tokens; the others (speech utterances
    for the audio teacher: no tokens) get IGNORE_INDEX everywhere."""
    has = token_lens > 0
    if bool(has.all()):
        return align_targets(tokens, token_lens, teacher_rate, student_rate, student_lens)
    B, Ts = tokens.shape[0], int(student_lens.max())
    out = torch.full((B, Ts, student_codebooks(tokens.shape[2], teacher_rate, student_rate)), IGNORE_INDEX,
                     dtype=torch.long)
    if bool(has.any()):
        part = align_targets(tokens[has], token_lens[has], teacher_rate, student_rate, student_lens[has])
        out[has, : part.shape[1]] = part
    return out


@dataclass
class ResumePoint:
    """Where a worker group starts: from step 0, or from what the latest checkpoint holds."""

    step: int = 0
    rank_states: Optional[list] = None        # every rank's data position at the checkpoint
    random_states: Optional[list] = None      # every rank's random streams at the checkpoint (random_state)
    world_sizes: list[int] = field(default_factory=list)
    metrics_rows: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[int] = None


def restore_checkpoint(ckpt, objective, optimizer, scheduler, lr: float, kind: str = "adamw") -> ResumePoint:
    """Load model, optimiser and scheduler state from a Ray Train checkpoint (None: a fresh start).

    ``lr`` (AdamW's peak or ScaledAdam's base lr, from the config; or one per parameter group) replaces the
    saved one: the world size or the config may have changed. ``kind`` must be the optimiser the checkpoint was trained with
    (checkpoints from before ``train.optimizer`` existed were trained with AdamW).

    A checkpoint that does not load now never will (every restart would resume from it), so any
    failure is a :class:`NonRetryableError` naming the folder.
    """
    if ckpt is None:
        return ResumePoint()
    try:
        with ckpt.as_directory() as d:
            state = json.load(open(os.path.join(d, STATE_FILE)))
            objective.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location="cpu",
                                                 weights_only=True))
            opt_state = torch.load(os.path.join(d, OPTIM_FILE), map_location="cpu", weights_only=True)
            saved_kind = opt_state.get("kind", "adamw")
            if saved_kind != kind:
                raise NonRetryableError(f"checkpoint {ckpt.path} was trained with train.optimizer={saved_kind}, this "
                                        f"run uses {kind}: set train.optimizer={saved_kind} to resume it, or train "
                                        "into a new output")
            optimizer.load_state_dict(opt_state["optimizer"])
            lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(optimizer.param_groups)
            for g, group_lr in zip(optimizer.param_groups, lrs):  # the world size or the config may have changed
                g["initial_lr" if kind == "adamw" else "base_lr"] = group_lr
            scheduler.load_state_dict(opt_state["scheduler"])  # Eden sets each group's lr from base_lr here
            with open(os.path.join(d, METRICS_FILE)) as f:
                metrics_rows = list(csv.DictReader(f))
            return ResumePoint(step=state["step"], rank_states=state["data_states"], world_sizes=state["world_sizes"],
                               metrics_rows=metrics_rows, resumed_from=state["step"],
                               random_states=state.get("random_states"))
    except NonRetryableError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same for the user
        raise NonRetryableError(f"checkpoint {ckpt.path} cannot be read ({first_line(exc)}): delete that "
                                "folder to resume from the one before, or train into a new output") from None


def resume_checkpoint(found: Optional[tuple[int, str]], storage_options: Any = None):
    """The checkpoint a worker group starts from: Ray Train's latest (this run's, after a worker restart
    or a resize) or ``found``, the newest complete checkpoint (step, URI) the job saw on storage before
    it started, whichever is further on; None: a fresh start.

    Ray Train knows only the checkpoints its run snapshot lists, and a driver killed right after a
    checkpoint was written may not have listed it there: a re-run then resumed from an older
    checkpoint, or trained from step 0, while the job said it resumed from the newest. Ray's latest is
    taken only when it is complete (:func:`spear.schemas.checkpoint.incomplete_reason`): an earlier run's
    snapshot can list one whose files were cut short or lost since.
    """
    import ray.train
    from ray.train import Checkpoint

    latest = ray.train.get_checkpoint()
    latest_step = _complete_step(latest) if latest is not None else None
    if latest_step is not None and (found is None or latest_step >= int(found[0])):
        return latest
    if found is None:
        return None
    fs, path = cached_storage(storage_options).pyarrow_filesystem(found[1])
    return Checkpoint(path=path, filesystem=fs)


def _complete_step(ckpt) -> Optional[int]:
    """The step of a Ray Train checkpoint whose files are complete; None when they are not, or cannot be read."""
    import pyarrow.fs as pafs

    try:
        root = ckpt.path.rstrip("/")
        infos = ckpt.filesystem.get_file_info(pafs.FileSelector(root))
        sizes = {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}
        text = None
        if STATE_FILE in sizes:
            with ckpt.filesystem.open_input_stream(f"{root}/{STATE_FILE}") as f:
                text = f.read().decode()
        if incomplete_reason(text, sizes) is None:
            return parse_state(text)["step"]
    except Exception:  # noqa: BLE001 - unreadable: the one found on storage is the one to try
        pass
    return None


def record_group_start(config: dict[str, Any], world: int, resumed_from: Optional[int]) -> None:
    """One object per worker-group start (rank 0): the sizes a run went through, whichever checkpoint it
    resumed from, and the torch threads rank 0 computes on."""
    if config.get("events_uri"):
        event = {"time": time.time(), "world_size": world, "resumed_from_step": resumed_from, "pid": os.getpid(),
                 "torch_threads": torch.get_num_threads()}
        cached_storage(config.get("storage_options")).write_text(
            join_uri(config["events_uri"], f"{time.time_ns()}-start.json"), json.dumps(event))


def gather_data_states(loader, rank: int, world: int, step: int, timeout_s: float,
                       random: dict[str, str]) -> tuple[list, list]:
    """Every rank's data position and random streams (``random``: this rank's :func:`random_state`) at a
    checkpoint, as two lists by rank (one all-gather when there are several ranks)."""
    mine = (loader.state(), random)
    if world == 1:
        return [mine[0]], [mine[1]]
    all_states = [None] * world
    with collective_timeout_ends_run(rank, world, timeout_s, f"for the data positions at the checkpoint of step {step}"):
        torch.distributed.all_gather_object(all_states, mine)
    return [s[0] for s in all_states], [s[1] for s in all_states]


def _tensor_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank's random streams when it starts at ``step`` without saved ones (a fresh start's
    masks, a resize).

    >>> step_seed(0, 0, 1), step_seed(1, 2, 0)
    (1, 1002021)
    """
    return seed * 1_000_003 + step * 1009 + rank


def random_state(device: torch.device, generator: Optional[torch.Generator] = None) -> dict[str, str]:
    """This rank's random streams as JSON-able text: torch's global generator (dropout draws from it),
    the GPU's on a GPU, and ``generator`` (pre-training's masks) where given.

    >>> g = torch.Generator().manual_seed(3)
    >>> saved = random_state(torch.device("cpu"), g)
    >>> a = (torch.rand(2), torch.rand(2, generator=g))
    >>> restore_random_state(saved, torch.device("cpu"), g)
    >>> b = (torch.rand(2), torch.rand(2, generator=g))
    >>> all(torch.equal(x, y) for x, y in zip(a, b))
    True
    """
    out = {"torch": _tensor_text(torch.get_rng_state())}
    if device.type == "cuda":
        out["cuda"] = _tensor_text(torch.cuda.get_rng_state(device))
    if generator is not None:
        out["generator"] = _tensor_text(generator.get_state())
    return out


def restore_random_state(saved: dict[str, str], device: torch.device,
                         generator: Optional[torch.Generator] = None) -> None:
    """Set the streams :func:`random_state` saved (those it holds)."""
    if "torch" in saved:
        torch.set_rng_state(_text_tensor(saved["torch"]))
    if "cuda" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(_text_tensor(saved["cuda"]), device)
    if "generator" in saved and generator is not None:
        generator.set_state(_text_tensor(saved["generator"]))


def resume_random(start: ResumePoint, rank: int, world: int, seed: int, device: torch.device,
                  generator: Optional[torch.Generator] = None) -> None:
    """After a restart, the random streams continue: at the checkpoint's world size each rank's exactly
    where they were (a resumed run draws the dropout and masks an uninterrupted one would); at another
    world size, or from a checkpoint without them, reseeded from (seed, step, rank). A fresh start keeps
    the seeding the caller did."""
    if start.resumed_from is None:
        return
    states = start.random_states or []
    if len(states) == world and states[rank]:
        restore_random_state(states[rank], device, generator)
    else:
        torch.manual_seed(step_seed(seed, start.step, rank))


def save_checkpoint(directory: str, *, objective, optimizer, scheduler, state: dict[str, Any],
                    metrics_rows: list[dict[str, Any]], kind: str = "adamw") -> None:
    """Write one checkpoint's files into ``directory`` (rank 0, before reporting it to Ray Train); the state
    file last, with every other file's size (:mod:`spear.schemas.checkpoint`: how a reader tells a
    complete checkpoint from one whose upload was cut short)."""
    torch.save(objective.state_dict(), os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "kind": kind},
               os.path.join(directory, OPTIM_FILE))
    _write_metrics(metrics_rows, os.path.join(directory, METRICS_FILE))
    sizes = {name: os.path.getsize(os.path.join(directory, name)) for name in (MODEL_FILE, OPTIM_FILE, METRICS_FILE)}
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({**state, FILE_SIZES_KEY: sizes}, f)


#: Rank 0 prints a progress line every this many steps (and at the last one), over the steps since the last line.
PROGRESS_EVERY = 25


def progress_line(rows: list[dict[str, Any]], step: int, max_steps: int, *, label: str = "train",
                  accuracies: str = "/acc_masked", rate: tuple[str, str] = ("audio_seconds_per_s", "audio s/s")) -> str:
    """``[train] step 50/450: loss 6.1, speech/acc_masked 0.12, ..., 41 audio s/s`` over ``rows`` (the last
    steps' metrics): the mean loss and accuracies (steps without targets, nan, left out) and the rate.

    >>> progress_line([{"loss": 2.0, "speaker/acc": 0.5, "utterances_per_s": 80.0},
    ...                {"loss": 1.0, "speaker/acc": float("nan"), "utterances_per_s": 40.0}], 2, 10,
    ...               label="posttrain", accuracies="/acc", rate=("utterances_per_s", "utterances/s"))
    '[posttrain] step 2/10: loss 1.500, speaker/acc 0.500, 53 utterances/s'
    >>> progress_line([{"loss": float("nan"), "speech/acc_masked": 0.25, "audio_seconds_per_s": 30.0}], 25, 450)
    '[train] step 25/450: loss nan, speech/acc_masked 0.250, 30 audio s/s'
    """
    def mean(key: str) -> float:
        vals = [float(r[key]) for r in rows if key in r and r[key] == r[key]]
        return sum(vals) / len(vals) if vals else float("nan")

    rate_key, unit = rate
    accs = sorted({k for r in rows for k in r if k.endswith(accuracies)})
    per_s = len(rows) / sum(1.0 / max(float(r[rate_key]), 1e-9) for r in rows) if rows else 0.0
    parts = [f"loss {mean('loss'):.3f}"] + [f"{k} {mean(k):.3f}" for k in accs]
    return f"[{label}] step {step}/{max_steps}: " + ", ".join(parts) + f", {per_s:.0f} {unit}"


def quiet_report_lines() -> None:
    """Drop Ray Train's "Reporting training result N: TrainingReport(...)" INFO line, one per checkpoint on
    every worker's console. Ray 2.60 logs it through a logger named after its source file's path,
    outside the ``ray.train`` loggers that ``LoggingConfig`` sets, so only its own level silences it;
    warnings still pass. Called by the workers at start."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its line stays
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` = {"train": TrainConfig dict, "plan": TrainDataPlan, "storage_options",
    "max_workers", "events_uri", "resume_from": (step, URI) of the newest checkpoint on
    storage or None}."""
    # Ray Train is imported inside the worker only: the driver imports this module before Ray starts.
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = config["plan"]
    try:  # the same config on every rank: all fail alike, none waits for another
        cfg = TrainConfig.model_validate(config["train"])
        torch.manual_seed(cfg.seed)  # train.seed sets the initial weights too, not only data order and masks
        objective = build_objective(cfg, plan)
    except ValueError as exc:
        raise NonRetryableError(f"bad training config: {first_line(exc)}") from None
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_worker_threads(ctx.get_local_world_size()))

    kind = cfg.optimizer_kind
    optimizer, scheduler, lr = build_optimizer(objective, cfg, world, int(config["max_workers"]))
    start = restore_checkpoint(resume_checkpoint(config.get("resume_from"), config.get("storage_options")),
                               objective, optimizer, scheduler, lr, kind)
    if start.resumed_from is None and cfg.init_from:  # a fresh run from a released model or an export
        try:  # in place, before DDP wraps the model; every rank loads the same weights
            initialise_encoder(objective.encoder, cfg.init_from, cached_storage(config.get("storage_options")))
        except (ValueError, FileNotFoundError) as exc:
            raise NonRetryableError(f"train.init_from: {first_line(exc)}") from None
    epoch_per_step = eden_epoch_per_step(cfg, plan, world) if kind == "scaled_adam" else 0.0
    step, metrics_rows = start.step, start.metrics_rows
    world_sizes = start.world_sizes if start.world_sizes and start.world_sizes[-1] == world else start.world_sizes + [world]
    if rank == 0:
        record_group_start(config, world, start.resumed_from)

    model = ray.train.torch.prepare_model(objective)
    encoder = objective.encoder
    fbank = KaldiFbank(num_mel_bins=cfg.student.num_mel_bins).to(device)
    loader = TrainBatches(plan, config.get("storage_options"), rank=rank, world_size=world,
                          batch_seconds=cfg.batch_seconds, audio_weight=cfg.audio_weight, seed=cfg.seed,
                          state=resume_state(start.rank_states or [], rank, world))
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, rank))
    resume_random(start, rank, world, cfg.seed, device, generator)
    t_last = time.monotonic()
    audio_seconds = 0.0
    model.train()
    batches = iter(loader)
    while step < cfg.max_steps:
        try:
            batch = next(batches)
        except StopIteration:
            batch = None
        except (TrainDataError, AudioDecodeError) as exc:
            raise NonRetryableError(f"rank {rank}: {exc}") from None
        prepared = None if batch is None else prepare_batch(batch, plan, cfg, encoder, fbank, generator, device)
        state = NO_BATCH if prepared is None else HAS_TARGETS if has_any_target(prepared[2]) else NO_TARGETS
        # all ranks step together or stop together: DDP's all-reduce needs every rank
        states = agree_step(state, rank, world, device, step, cfg.collective_timeout_s)
        empty = [r for r, rank_state in enumerate(states) if rank_state == NO_BATCH]
        if empty:
            rows = ", ".join(f"{plan.live_rows(d)} {d}" for d in ("speech", "audio") if d in plan.units)
            raise NonRetryableError(f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of {world} "
                                    f"ran out of rows at step {step + 1}: the token dataset has {rows} live rows, "
                                    f"fewer than the {world} workers; train with fewer workers")
        masked, feat_lens, targets, secs = prepared
        with torch.autocast(**autocast_settings(device, cfg.precision)):
            out = model(masked.feats, feat_lens, targets, frame_mask=masked.frame_mask)
        optimizer.zero_grad(set_to_none=True)
        with collective_timeout_ends_run(rank, world, cfg.collective_timeout_s,
                                         f"in the gradient all-reduce of step {step + 1}"):
            out.loss.backward()  # on every rank, even without targets: DDP's all-reduce needs it
        update = HAS_TARGETS in states
        apply_update(model, optimizer, scheduler, kind, epoch_per_step, update)
        step += 1
        audio_seconds += secs
        m = out.metrics()
        if kind == "scaled_adam":
            m["clip_scale"] = optimizer.clipping_stats().get("group0/clip_scale", 1.0)
        now = time.monotonic()
        metrics_rows.append({
            "step": step, "world_size": world, "lr": scheduler.get_last_lr()[0],
            "audio_seconds_per_s": audio_seconds / max(now - t_last, 1e-9), "updated": int(update),
            # which rows this step trained on (rank 0's batch): audits resume and reproducibility
            "batch_digest": hashlib.sha1("|".join(batch["segment_ids"].tolist()).encode()).hexdigest()[:16], **m})
        if rank == 0 and (step % PROGRESS_EVERY == 0 or step >= cfg.max_steps):
            # to the process's own stderr, which Ray forwards once to the driver's stderr (progress never mixes with
            # the summary on stdout): Ray Train's patched print() would both tee it and log it (every line twice)
            since = metrics_rows[-(step % PROGRESS_EVERY or PROGRESS_EVERY):]
            print(progress_line(since, step, cfg.max_steps), file=sys.__stderr__, flush=True)
        if step % cfg.checkpoint_every == 0 or step >= cfg.max_steps:
            all_states, random_states = gather_data_states(loader, rank, world, step, cfg.collective_timeout_s,
                                                           random_state(device, generator))
            metrics = {"step": step, "loss": m["loss"], "world_size": world}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(d, objective=objective, optimizer=optimizer, scheduler=scheduler,
                                    metrics_rows=metrics_rows, kind=kind,
                                    state={"step": step, "data_states": all_states, "random_states": random_states,
                                           "world_sizes": world_sizes,
                                           "resumed_from": start.resumed_from, "token_version": plan.token_version,
                                           "heads": heads_info(plan), "train": config["train"]})
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics, checkpoint=None)
            audio_seconds, t_last = 0.0, time.monotonic()


def _write_metrics(rows: list[dict[str, Any]], path: str) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)

