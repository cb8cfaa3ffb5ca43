"""The training job (`spear train`): Ray Train (TorchTrainer, Train V2) on the committed shards of one token version.

Checkpoints go to ``OUTPUT/train/`` (Ray Train's storage, local or S3); a re-run with the same
output resumes from the latest checkpoint; ``train.workers = (min, max)`` makes the run elastic
(Ray Train restarts from the latest checkpoint at the new world size; the loop rescales the
learning rate and merges the data positions, see :mod:`spear.stages.train_loop`). After
training, ``OUTPUT/metrics/`` gets the per-step metrics as CSV, TensorBoard event files and a
loss-curve plot.

Example::

    cfg = load_config("spear.yaml", ["train.shards=s3://bucket/tokens", "output=s3://bucket/student"])
    summary = run_train(cfg)
    print(summary.step, summary.last_loss, summary.checkpoint)
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from spear.cluster.console import console_log
from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageError, StorageOptions, join_uri, normalize_uri
from spear.config import ConfigError, SpearConfig, TrainConfig
from spear.pipeline.ledger import TokenStore, select_token_store
from spear.pipeline.ray_train import (checkpoint_folders, failure_line, remove_unkept_checkpoints, run_config,
                                      scaling_config, workers_use_gpus)
from spear.schemas.checkpoint import incomplete_reason, parse_state
from spear.schemas.train_metrics import METRICS_FILE, learned_losses, steps_without_update
from spear.stages.artefacts import export_student
from spear.stages.train_data import TrainDataError, TrainDataPlan
from spear.stages.train_loop import MODEL_FILE, STATE_FILE, build_objective, train_loop_per_worker

RUN_NAME = "train"


class TrainError(RuntimeError):
    """`spear train` failed; the message is one line naming the cause (the traceback is in the log)."""


@dataclass
class TrainSummary:
    """What `spear train` did; ``to_dict()`` is the ``--json`` object."""

    step: int
    first_loss: Optional[float]
    last_loss: Optional[float]
    resumed_from_step: Optional[int]
    world_sizes: list[int] = field(default_factory=list)
    checkpoint: Optional[str] = None
    output: str = ""
    token_version: str = ""
    metrics: dict[str, str] = field(default_factory=dict)   # csv / tensorboard / plot URIs
    wall_seconds: float = 0.0
    steps_without_targets: int = 0  # batches with no target of the student's teachers: no update
    warnings: list[str] = field(default_factory=list)  # e.g. incomplete checkpoints the resume skipped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        res = f"resumed from step {self.resumed_from_step}" if self.resumed_from_step is not None else "fresh start"
        loss = "n/a" if self.first_loss is None else f"{self.first_loss:.3f} -> {self.last_loss:.3f}"
        skipped = (f"{self.steps_without_targets} of {self.step} steps had no target of the student's teachers "
                   "(e.g. an audio-only student's all-speech batches): no update, loss nan in the metrics\n"
                   if self.steps_without_targets else "")
        return (f"trained to step {self.step} ({res}) on token version {self.token_version}, world sizes {self.world_sizes}\n"
                f"loss {loss}\n{skipped}checkpoint: {self.checkpoint}\n"
                f"metrics: {self.metrics.get('csv')}  plot: {self.metrics.get('plot')}"
                + "".join(f"\nwarning: {w}" for w in self.warnings))


def plan_training_data(store: TokenStore, roles: Sequence[str] = ("speech", "audio")) -> TrainDataPlan:
    """The :class:`~spear.stages.train_data.TrainDataPlan` of one committed token version.

    Example::

        store = select_token_store("out/tokens", Storage(), None)
        plan = plan_training_data(store)
        plan.live_rows("speech")
    """
    return TrainDataPlan.from_committed(ledger=store.ledger(), version_info=store.version_info(),
                                       files=store.shard_files(), token_version=store.version,
                                       storage_options=store.storage.options, roles=roles)


@dataclass(frozen=True)
class CheckpointListing:
    """The checkpoint folders under ``OUTPUT/train``: ``complete`` as (step, URI) by step, ``incomplete`` as
    (URI, why) (:func:`spear.schemas.checkpoint.incomplete_reason`)."""

    complete: list[tuple[int, str]]
    incomplete: list[tuple[str, str]]

    def warnings(self) -> list[str]:
        """One line per incomplete checkpoint, for a job that resumes past it."""
        return [f"checkpoint {uri} is skipped: {why} (a run stopped while writing it, or one is writing it now)"
                for uri, why in self.incomplete]


def list_checkpoints(output: str, storage: Storage) -> CheckpointListing:
    """Every checkpoint folder under ``OUTPUT/train``, complete or not.

    A folder is complete when its state file parses and every file it lists has the size the state
    records (:mod:`spear.schemas.checkpoint`): Ray Train uploads a checkpoint's files in no set order,
    so one whose upload was cut short (or is still going on) is listed as incomplete and never resumed from.
    """
    root = join_uri(output, RUN_NAME)
    complete, incomplete = [], []
    for name in checkpoint_folders(root, storage):
        uri = join_uri(root, name)
        fs, path = storage.filesystem(uri)
        sizes = {info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
                 for info in fs.ls(path, detail=True) if info.get("type") != "directory"}
        state_text = storage.read_text(join_uri(uri, STATE_FILE)) if STATE_FILE in sizes else None
        why = incomplete_reason(state_text, sizes)
        if why is None:
            complete.append((parse_state(state_text)["step"], uri))
        else:
            incomplete.append((uri, why))
    return CheckpointListing(sorted(complete), incomplete)


def checkpoints(output: str, storage: Storage) -> list[tuple[int, str]]:
    """(step, URI) of every complete checkpoint under ``OUTPUT/train``, by step (:func:`list_checkpoints`)."""
    return list_checkpoints(output, storage).complete


def worker_group_starts(output: str, storage: Storage, since: float = 0.0) -> list[dict[str, Any]]:
    """Every worker-group start recorded by the training loop (time, world_size, resumed_from_step), in order."""
    root = join_uri(output, RUN_NAME, "events")
    try:
        entries = storage.list_files(root, extensions=["json"])
    except StorageError:
        return []
    events = [json.loads(storage.read_text(e.uri)) for e in entries]
    return sorted((e for e in events if e["time"] >= since), key=lambda e: e["time"])


def run_train(cfg: SpearConfig, *, progress: bool = True) -> TrainSummary:
    """Train (or resume training) the student described by ``cfg.train`` on ``cfg.train.shards``."""
    log = console_log(progress, prefix="[train] ")
    t0, started = time.monotonic(), time.time()
    if not cfg.train.shards:
        raise ConfigError("no token dataset to train on: give --shards URI (the output of `spear tokenize`) "
                          "or set train.shards")
    # absolute spellings: Ray Train workers run in their own directory, and what they record must name these
    cfg = cfg.model_copy(update={"output": normalize_uri(cfg.output), "train": cfg.train.model_copy(
        update={"shards": normalize_uri(cfg.train.shards)})})
    options = StorageOptions.from_config(cfg.storage)
    storage = Storage(options)
    storage.check_access(cfg.train.shards)
    storage.check_access(cfg.output)
    store = select_token_store(cfg.train.shards, storage, cfg.train.token_version)
    try:
        # reads every shard's footer: a missing shard fails here, at once
        plan = plan_training_data(store, roles=cfg.train.teacher_roles)
    except TrainDataError as exc:
        raise TrainError(str(exc)) from None
    if not plan.roles:
        raise ConfigError(f"train.teacher_roles {cfg.train.teacher_roles} names no teacher of token version "
                          f"{store.version} (its teachers: {', '.join(store.version_info().teachers) or 'none'})")
    lo, hi = cfg.train.workers
    most = max((plan.live_rows(d) for d in plan.units), default=0)
    if most < hi:  # a rank with no rows could not take part in a single step
        raise ConfigError(f"token version {store.version} has {most} live rows in its largest domain, fewer than "
                          f"the {hi} workers asked for (train.workers): every worker needs rows; "
                          f"use at most {max(most, 1)} workers or add data")
    listing = list_checkpoints(cfg.output, storage)
    before = listing.complete
    resumed_from = before[-1][0] if before else None
    for line in listing.warnings():
        log(f"warning: {line}")
    log(f"token version {store.version}: {len(plan.files)} shards, "
        + ", ".join(f"{s / 3600:.3f} h {d}" for d, s in sorted(plan.seconds_by_domain.items()))
        + (f"; resuming from step {resumed_from}" if resumed_from is not None else ""))

    if resumed_from is None or resumed_from < cfg.train.max_steps:
        with ray_session(cfg.ray) as rinfo:
            from ray.train.torch import TorchConfig, TorchTrainer

            use_gpu = workers_use_gpus(rinfo, "train")
            resources = {"CPU": cfg.train.cpus_per_worker}
            if use_gpu:
                resources["GPU"] = 1
            scaling = scaling_config(lo, hi, use_gpu, resources, cfg.train.elastic_monitor_s)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"train": cfg.train.model_dump(mode="json"), "plan": plan,
                                   "storage_options": options, "max_workers": hi,
                                   "events_uri": join_uri(cfg.output, RUN_NAME, "events"),
                                   # what the workers resume from: Ray's run snapshot may lack the newest
                                   "resume_from": before[-1] if before else None},
                scaling_config=scaling,
                # the process group's timeout bounds every collective (DDP's all-reduce, the step agreement)
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                         timeout_s=max(1, int(round(cfg.train.collective_timeout_s)))),
                run_config=run_config(RUN_NAME, cfg.output, storage, cfg.train.max_failures),
            )
            from ray.train import TrainingFailedError

            try:
                trainer.fit()
            except TrainingFailedError as exc:
                raise TrainError(failure_line(exc, cfg.train.max_failures)) from exc
            remove_unkept_checkpoints(join_uri(cfg.output, RUN_NAME), storage, log=log)

    after = checkpoints(cfg.output, storage)
    if not after:
        raise RuntimeError(f"training produced no checkpoint under {join_uri(cfg.output, RUN_NAME)}")
    step, ckpt_uri = after[-1]
    state = json.loads(storage.read_text(join_uri(ckpt_uri, STATE_FILE)))
    rows = list(csv.DictReader(io.StringIO(storage.read_text(join_uri(ckpt_uri, METRICS_FILE)))))
    metrics = write_metrics_report(rows, join_uri(cfg.output, "metrics"), storage)
    losses = learned_losses(rows)
    sizes = [e["world_size"] for e in worker_group_starts(cfg.output, storage, since=started)]
    world_sizes = [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]] or state["world_sizes"]
    return TrainSummary(step=step, first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                        resumed_from_step=resumed_from, world_sizes=world_sizes, checkpoint=ckpt_uri,
                        output=cfg.output, token_version=store.version, metrics=metrics,
                        wall_seconds=time.monotonic() - t0,
                        steps_without_targets=steps_without_update(rows), warnings=listing.warnings())


def write_metrics_report(rows: list[dict[str, str]], directory: str, storage: Storage) -> dict[str, str]:
    """metrics.csv, TensorBoard event files and loss_curve.png under ``directory``; returns their URIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(os.path.join(tmp, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        tb_dir = os.path.join(tmp, "tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(tb_dir)
            for r in rows:
                for k, v in r.items():
                    if k != "step" and v not in (None, ""):
                        try:
                            writer.add_scalar(k, float(v), int(float(r["step"])))
                        except ValueError:
                            continue
            writer.close()
        except ImportError:  # tensorboard is a dependency; keep the CSV and plot if it is missing
            tb_dir = ""
        steps = [int(float(r["step"])) for r in rows]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        # pre-training: loss, <role>/ce, <role>/acc_mean...; post-training: loss, <attribute>/loss, <attribute>/acc
        for key in [k for k in keys if k == "loss" or k.endswith("/ce") or k.endswith("/loss")]:
            ax[0].plot(steps, [float(r[key]) if r.get(key) not in (None, "", "nan") else float("nan") for r in rows],
                       label=key)
        ax[0].set_xlabel("step")
        ax[0].set_title("loss")
        ax[0].legend()
        for key in [k for k in keys if ("acc" in k and "mean" in k) or k.endswith("/acc")]:
            ax[1].plot(steps, [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows], label=key)
        ax[1].set_xlabel("step")
        ax[1].set_title("accuracy")
        if ax[1].lines:
            ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "loss_curve.png"), dpi=100)
        plt.close(fig)
        for root, _, files in os.walk(tmp):
            for name in files:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, tmp)
                with open(local, "rb") as f:
                    storage.write_bytes(join_uri(directory, rel), f.read())
    out["csv"] = join_uri(directory, "metrics.csv")
    out["plot"] = join_uri(directory, "loss_curve.png")
    if tb_dir:
        out["tensorboard"] = join_uri(directory, "tensorboard")
    return out



@dataclass
class ExportSummary:
    checkpoint: str
    output: str
    step: int
    architecture: str
    frame_rate: float
    layer_dims: list[int]
    token_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        return (f"exported step {self.step} ({self.architecture}, {len(self.layer_dims)} layers, {self.frame_rate:g} Hz) "
                f"from {self.checkpoint} to {self.output}")


def load_checkpoint_objective(checkpoint: str, storage: Storage):
    """(SpearObjective with the checkpoint's weights, its train state) from a checkpoint URI or a training output."""
    if not storage.exists(join_uri(checkpoint, STATE_FILE)):
        found = checkpoints(checkpoint, storage)
        if not found:
            raise ConfigError(f"{checkpoint} is neither a training checkpoint nor a training output with checkpoints")
        checkpoint = found[-1][1]
    state = json.loads(storage.read_text(join_uri(checkpoint, STATE_FILE)))
    heads = state["heads"]
    plan = TrainDataPlan(files=(), live_keys=frozenset(), seconds_by_domain={}, roles=tuple(heads["roles"]),
                         codebooks={k: int(v) for k, v in heads["codebooks"].items()},
                         frame_rates={k: float(v) for k, v in heads["frame_rates"].items()},
                         token_version=state.get("token_version", ""))
    objective = build_objective(TrainConfig.model_validate(state["train"]), plan)
    weights = torch.load(io.BytesIO(storage.read_bytes(join_uri(checkpoint, MODEL_FILE))), map_location="cpu",
                         weights_only=True)
    objective.load_state_dict(weights)
    return objective.eval(), dict(state, checkpoint=checkpoint)


def run_export(checkpoint: str, output: str, storage: Storage | None = None) -> ExportSummary:
    """`spear export`: the student of a checkpoint as a standalone model (safetensors + config.json)."""

    storage = storage or Storage()
    objective, state = load_checkpoint_objective(normalize_uri(checkpoint), storage)
    enc = objective.encoder
    export_student(objective, output, storage=storage,
                   metadata={"step": state["step"], "token_version": state.get("token_version"),
                             "checkpoint": state["checkpoint"], "teachers": state["heads"]})
    return ExportSummary(checkpoint=state["checkpoint"], output=output, step=int(state["step"]),
                         architecture=state["train"]["student"]["architecture"], frame_rate=float(enc.frame_rate),
                         layer_dims=list(enc.layer_dims), token_version=state.get("token_version", ""))
