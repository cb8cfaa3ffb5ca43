"""The post-training job (`spear posttrain`): one encoder into utterance-level embeddings, on Ray Train.

Steps: the input model (``posttrain.model``: a `spear export` folder, a released SPEAR model, or a
training output / checkpoint, whose student is exported once to ``OUTPUT/posttrain/input-model``)
-> the labelled manifests prepared once into tables (:func:`~spear.stages.posttrain_data.prepare_posttrain_data`,
reused while the manifests are unchanged) -> the attributes' labels and targets
(:func:`~spear.stages.posttrain_batches.plan_posttrain`) -> a TorchTrainer (elastic between
``posttrain.workers`` = (min, max), restarted from the latest checkpoint on a failure or resize; a
re-run into the same output resumes) running :func:`~spear.stages.posttrain_loop.posttrain_loop_per_worker`
-> the metrics (CSV, TensorBoard, plot) -> the export (:func:`~spear.stages.artefacts.export_posttrained`).

Layout under ``OUTPUT/posttrain/``: ``data/`` (prepared tables, quarantine), ``train/`` (Ray Train's
storage: checkpoints, worker-group events), ``metrics/``, ``model/`` (the export).

Example::

    cfg = load_config(None, ["posttrain.model=out/student", "posttrain.train_manifests=[\\"corpus/train.csv\\"]",
                             "output=out"])
    summary = run_posttrain(cfg)
    print(summary.human())
    model = load_posttrained(summary.model)        # spear.stages.artefacts
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from spear.cluster.console import console_log
from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageOptions, join_uri, normalize_uri
from spear.config import ConfigError, SpearConfig
from spear.pipeline.ray_train import (failure_line, remove_unkept_checkpoints, run_config, scaling_config,
                                      workers_use_gpus)
from spear.pipeline.train_job import (RUN_NAME, checkpoints, list_checkpoints, load_checkpoint_objective,
                                      worker_group_starts, write_metrics_report)
from spear.schemas.train_metrics import METRICS_FILE, learned_losses
from spear.stages.artefacts import export_posttrained, export_student
from spear.stages.posttrain_batches import COLUMNS, PostTrainPlan, plan_posttrain
from spear.stages.posttrain_data import prepare_posttrain_data, read_prepared
from spear.stages.posttrain_loop import build_posttrain_model, load_posttrain_checkpoint, posttrain_loop_per_worker
from spear.stages.text_targets import build_text_targets
from spear.stages.train_loop import STATE_FILE, first_line
from spear.synthetic.counting import CountingGenerator

#: Under OUTPUT: everything of `spear posttrain`.
POSTTRAIN_DIR = "posttrain"
#: Under OUTPUT/posttrain: the export, the input model exported from a training checkpoint, the metrics.
MODEL_DIR, INPUT_MODEL_DIR, METRICS_DIR, DATA_DIR = "model", "input-model", "metrics", "data"


class PostTrainError(RuntimeError):
    """`spear posttrain` failed; the message is one line naming the cause (the traceback is in the log)."""


@dataclass
class PostTrainSummary:
    """What `spear posttrain` did; ``to_dict()`` is the ``--json`` object.

    ``attributes``: per attribute its kind, embedding size, training rows and the mean loss / accuracy
    over the last steps; ``data``: the prepared data (:class:`~spear.stages.posttrain_data.PreparedData`).
    """

    step: int
    first_loss: Optional[float]
    last_loss: Optional[float]
    resumed_from_step: Optional[int]
    world_sizes: list[int] = field(default_factory=list)
    checkpoint: Optional[str] = None
    model: str = ""                 # the export (load_posttrained)
    input_model: str = ""
    output: str = ""                # OUTPUT/posttrain
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        res = f"resumed from step {self.resumed_from_step}" if self.resumed_from_step is not None else "fresh start"
        lines = [f"post-trained {self.input_model} to step {self.step} ({res}), world sizes {self.world_sizes}",
                 f"loss {_fmt(self.first_loss)} -> {_fmt(self.last_loss)}"]
        for name, a in self.attributes.items():
            acc = f", accuracy {a['acc']:.3f}" if a.get("acc") is not None else ""
            rows = "synthetic clips" if a["kind"] == "counting" else f"{a['rows']} training rows"
            lines.append(f"  {name} ({a['kind']}, dim {a['dim']}): {rows}, loss {_fmt(a.get('loss'))}{acc} (last steps)")
        lines += [f"model: {self.model}", f"checkpoint: {self.checkpoint}",
                  f"metrics: {self.metrics.get('csv')}  plot: {self.metrics.get('plot')}"]
        return "\n".join(lines)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _normalised(cfg: SpearConfig) -> SpearConfig:
    """Absolute spellings of every URI (Ray Train workers run in their own directory)."""
    p = cfg.posttrain
    return cfg.model_copy(update={"output": normalize_uri(cfg.output), "posttrain": p.model_copy(update={
        "model": normalize_uri(p.model) if p.model else p.model,
        "train_manifests": [normalize_uri(m) for m in p.train_manifests],
        "eval_manifests": [normalize_uri(m) for m in p.eval_manifests]})})


def resolve_input_model(model: str, root: str, storage: Storage) -> str:
    """The URI the workers load the input model from: ``model`` itself (an export or a release), or, for a
    training output or checkpoint, its student exported once to ``root/input-model``."""
    if storage.exists(join_uri(model, STATE_FILE)) or checkpoints(model, storage):
        objective, state = load_checkpoint_objective(model, storage)
        dest = join_uri(root, INPUT_MODEL_DIR)
        export_student(objective, dest, storage=storage,
                       metadata={"step": state["step"], "checkpoint": state["checkpoint"],
                                 "token_version": state.get("token_version")})
        return dest
    if not storage.exists(model):
        raise ConfigError(f"posttrain.model {model} does not exist (a `spear export` folder, a released SPEAR model, "
                          "or a training output)")
    return model


def _attribute_summary(plan: PostTrainPlan, specs, rows: list[dict[str, str]], last: int = 20) -> dict[str, dict]:
    def mean(key: str) -> Optional[float]:
        vals = [float(r[key]) for r in rows[-last:] if r.get(key) not in (None, "", "nan")]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else None

    return {s.name: {"kind": s.kind, "dim": s.dim, "rows": int(len(plan.eligible(s.name))),
                     "loss": mean(f"{s.name}/loss"), "acc": mean(f"{s.name}/acc") if s.kind != "semantic" else None}
            for s in specs}


def run_posttrain(cfg: SpearConfig, *, progress: bool = True) -> PostTrainSummary:
    """Post-train (or resume post-training) ``cfg.posttrain.model`` on ``cfg.posttrain.train_manifests``."""
    t0, started = time.monotonic(), time.time()
    p = cfg.posttrain
    if not p.model:
        raise ConfigError("no input model to post-train: give --model URI (a `spear export` folder, a released SPEAR "
                          "model or a training output) or set posttrain.model")
    if not p.train_manifests:
        raise ConfigError("no training manifests: give --train-manifest URI (CSV/JSONL with audio and speaker/text/"
                          "pivot, or a Lhotse CutSet) or set posttrain.train_manifests")
    cfg = _normalised(cfg)
    p = cfg.posttrain
    options = StorageOptions.from_config(cfg.storage)
    storage = Storage(options)
    storage.check_access(cfg.output)
    storage.check_access(p.model)
    root = join_uri(cfg.output, POSTTRAIN_DIR)
    say = console_log(progress)
    listing = list_checkpoints(root, storage)
    before = listing.complete
    resumed_from = before[-1][0] if before else None
    for line in listing.warnings():
        say(f"[posttrain] warning: {line}")
    model_uri = resolve_input_model(p.model, root, storage)
    lo, hi = p.workers

    with ray_session(cfg.ray) as rinfo:
        prepared = prepare_posttrain_data(p.train_manifests, p.eval_manifests, join_uri(root, DATA_DIR), storage,
                                          ray_cfg=cfg.ray, progress=say if progress else False)
        table = read_prepared(prepared.train_uri, storage, columns=[c for c in COLUMNS if c != "audio"])
        data_uri = join_uri(root, DATA_DIR)

        def targets(texts, attribute):  # cached under data/ (targets-<attr>.npy): a resumed run embeds nothing
            t = build_text_targets(texts, attribute, p.attributes.index(attribute), data_uri, storage,
                                   progress=say if progress else False)
            return t.vectors[t.lookup(texts)]

        plan = plan_posttrain(table, p.attributes, clip_seconds=p.counting_clip_seconds, targets=targets,
                              counting_generator=CountingGenerator)
        specs = plan.specs()
        for a in plan.attributes:
            n = len(plan.eligible(a.name))
            if a.kind != "counting" and n < hi:  # a rank with no rows of an attribute could not draw one
                raise ConfigError(f"posttrain.attributes: {a.name!r} ({a.kind}) has {n} training rows, fewer than the "
                                  f"{hi} workers asked for (posttrain.workers)")
        try:  # fails here, in one line naming the field, rather than on every worker
            build_posttrain_model(model_uri, specs, p, storage)
        except FileNotFoundError as exc:
            raise ConfigError(f"posttrain.model {p.model}: {first_line(exc)}") from None
        except ValueError as exc:
            raise ConfigError(f"posttrain (model {p.model}, freeze={p.freeze}, trainable_layers={p.trainable_layers})"
                              f": {exc}") from None
        say(f"[posttrain] {prepared.rows.get('train', 0)} training utterances; attributes "
            + ", ".join(f"{s.name} ({s.kind}, {len(plan.eligible(s.name)) if s.kind != 'counting' else 'synthetic'})"
                        for s in specs)
            + (f"; resuming from step {resumed_from}" if resumed_from is not None else ""))

        if resumed_from is None or resumed_from < p.max_steps:
            from ray.train import TrainingFailedError
            from ray.train.torch import TorchConfig, TorchTrainer

            use_gpu = workers_use_gpus(rinfo, "post-train")
            resources = {"CPU": p.cpus_per_worker}
            if use_gpu:
                resources["GPU"] = 1
            trainer = TorchTrainer(
                posttrain_loop_per_worker,
                train_loop_config={"posttrain": p.model_dump(mode="json"), "plan": plan, "model": model_uri,
                                   "train_uri": prepared.train_uri, "storage_options": options,
                                   "events_uri": join_uri(root, RUN_NAME, "events"),
                                   # what the workers resume from: Ray's run snapshot may lack the newest
                                   "resume_from": before[-1] if before else None},
                scaling_config=scaling_config(lo, hi, use_gpu, resources, p.elastic_monitor_s),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                         timeout_s=max(1, int(round(p.collective_timeout_s)))),
                run_config=run_config(RUN_NAME, root, storage, p.max_failures),
            )
            try:
                trainer.fit()
            except TrainingFailedError as exc:
                raise PostTrainError(failure_line(exc, p.max_failures, "posttrain.max_failures")) from exc
            remove_unkept_checkpoints(join_uri(root, RUN_NAME), storage, log=lambda line: say(f"[posttrain] {line}"))

    after = checkpoints(root, storage)
    if not after:
        raise PostTrainError(f"post-training produced no checkpoint under {join_uri(root, RUN_NAME)}")
    step, ckpt_uri = after[-1]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(join_uri(ckpt_uri, METRICS_FILE)))))
    metrics = write_metrics_report(rows, join_uri(root, METRICS_DIR), storage)
    export_uri = join_uri(root, MODEL_DIR)
    state = export_posttrain_checkpoint(ckpt_uri, export_uri, storage,
                                        metadata={"languages": prepared.languages.get("train", [])})
    losses = learned_losses(rows)
    sizes = [e["world_size"] for e in worker_group_starts(root, storage, since=started)]
    world_sizes = [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]] or state["world_sizes"]
    return PostTrainSummary(step=step, first_loss=losses[0] if losses else None,
                            last_loss=losses[-1] if losses else None, resumed_from_step=resumed_from,
                            world_sizes=world_sizes, checkpoint=ckpt_uri, model=export_uri, input_model=p.model,
                            output=root, attributes=_attribute_summary(plan, specs, rows), data=prepared.to_dict(),
                            metrics=metrics, wall_seconds=time.monotonic() - t0)


def posttrain_checkpoint(uri: str, storage: Storage) -> Optional[str]:
    """The post-training checkpoint ``uri`` names: itself (a checkpoint folder), or the latest one of a
    post-training output (``OUTPUT`` or ``OUTPUT/posttrain``); None when it is neither (e.g. a pre-training
    checkpoint or output)."""
    def is_posttrain_state(state_uri: str) -> bool:  # an unreadable state is left to the pre-training export's error
        try:
            return "specs" in json.loads(storage.read_text(state_uri))
        except ValueError:
            return False

    uri = normalize_uri(uri)
    state_uri = join_uri(uri, STATE_FILE)
    if storage.exists(state_uri):
        return uri if is_posttrain_state(state_uri) else None
    for root in (join_uri(uri, POSTTRAIN_DIR), uri):
        found = checkpoints(root, storage)
        if found and is_posttrain_state(join_uri(found[-1][1], STATE_FILE)):
            return found[-1][1]
    return None


def export_posttrain_checkpoint(checkpoint: str, output: str, storage: Storage,
                                metadata: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """`spear export` of a post-training checkpoint (or output: its latest checkpoint): the post-trained
    model at ``output`` (:func:`~spear.stages.artefacts.export_posttrained`: the student export plus the
    heads), with what it was trained on in its metadata; returns the checkpoint's state.

    Example::

        export_posttrain_checkpoint("runs/post", "models/post", Storage())
        load_posttrained("models/post")(wavs, lengths).embeddings["speaker"]
    """
    found = posttrain_checkpoint(checkpoint, storage)
    if found is None:
        raise ConfigError(f"{checkpoint} is neither a post-training checkpoint nor a `spear posttrain` output")
    model, state = load_posttrain_checkpoint(found, storage)
    info = state.get("info", {})
    export_posttrained(model, output, storage=storage, metadata={
        "step": state["step"], "checkpoint": found, "input_model": state["posttrain"].get("model"),
        "input_model_loaded_from": state["model"], "speakers": list(info.get("speakers", [])),
        "attributes": info.get("attributes", {}), "max_seconds": state["posttrain"].get("max_seconds"),
        **(metadata or {})})
    return dict(state, checkpoint=found)


@dataclass
class PostTrainExportSummary:
    """What `spear export` of a post-training checkpoint wrote; ``to_dict()`` is the ``--json`` object."""

    checkpoint: str
    output: str
    step: int
    attributes: dict[str, str]
    input_model: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        attrs = ", ".join(f"{n} ({k})" for n, k in self.attributes.items())
        return f"exported the post-trained model of step {self.step} ({attrs}) from {self.checkpoint} to {self.output}"


def run_posttrain_export(checkpoint: str, output: str, storage: Optional[Storage] = None) -> PostTrainExportSummary:
    """`spear export CHECKPOINT OUTPUT` for a post-training checkpoint or output."""
    storage = storage or Storage()
    state = export_posttrain_checkpoint(checkpoint, output, storage)
    return PostTrainExportSummary(checkpoint=state["checkpoint"], output=output, step=int(state["step"]),
                                  attributes={s["name"]: s["kind"] for s in state["specs"]},
                                  input_model=state["posttrain"].get("model"))
