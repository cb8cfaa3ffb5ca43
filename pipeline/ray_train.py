"""Ray Train plumbing shared by the training jobs (`spear train`, `spear posttrain`).

- :func:`scaling_config`: fixed or elastic (min, max) workers;
- :func:`ray_storage`: Ray Train's ``storage_path`` / ``storage_filesystem`` for an output URI;
- :func:`run_config`: the RunConfig both jobs use (checkpoints kept, restarts, quiet console);
- :func:`checkpoint_folders` lists a run's checkpoint folders; :func:`remove_unkept_checkpoints` deletes those an
  interrupted run left outside Ray's count;
- :func:`stop_retries_callback`: ends a run at the first :class:`NonRetryableError` of a worker;
- :func:`failure_line`: one line naming the root cause of a failed run.

Ray is imported inside the functions: the jobs import this module before Ray starts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from spear.cluster.storage import Storage, StorageError, join_uri, split_uri
from spear.config import ConfigError
from spear.stages.train_loop import NonRetryableError, first_line


def ray_storage(output: str, storage: Storage) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    scheme, path = split_uri(output)
    if scheme == "file":
        os.makedirs(path, exist_ok=True)
        return path, None
    fs, path = storage.pyarrow_filesystem(output)
    return path, fs


#: Checkpoints Ray Train keeps per run (older ones are deleted as new ones are reported).
CHECKPOINTS_KEPT = 3


def run_config(name: str, output: str, storage: Storage, max_failures: int):
    """The RunConfig of a training job writing under ``output/name``: ``max_failures`` restarts, the newest
    :data:`CHECKPOINTS_KEPT` checkpoints, a run that ends at the first :class:`NonRetryableError`, and Ray
    Train's own INFO lines (the worker group's start, each checkpoint's upload) kept to Ray's log files: the
    training loop prints its progress lines itself (the workers' "Reporting training result N" line, logged
    outside those loggers, is dropped by :func:`spear.stages.train_loop.quiet_report_lines`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    storage_path, storage_fs = ray_storage(output, storage)
    return RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                     callbacks=[stop_retries_callback()], logging_config=LoggingConfig(log_level="WARNING"))


#: Ray Train's record of a run's checkpoints (``storage_path/name/``): ``num_to_keep`` counts only those it lists.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def checkpoint_folders(run_dir: str, storage: Storage) -> list[str]:
    """The names of the checkpoint folders in ``run_dir`` (``output/name``), sorted (Ray names them by time),
    listed afresh; [] when ``run_dir`` does not exist.

    >>> checkpoint_folders("/nonexistent/train", Storage())
    []
    """
    if not storage.exists(run_dir):
        return []
    fs, path = storage.filesystem(run_dir)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)  # s3fs caches listings: a checkpoint written or cut since must show as it is now
    names = [info["name"].rstrip("/").rsplit("/", 1)[-1] for info in fs.ls(path, detail=True)
             if info.get("type") == "directory"]
    return sorted(n for n in names if n.startswith("checkpoint"))


def remove_unkept_checkpoints(run_dir: str, storage: Storage, log: Callable[[str], None] = lambda line: None
                              ) -> list[str]:
    """Delete the checkpoint folders in ``run_dir`` (``output/name``) that Ray Train's snapshot does not list
    and that are older than the newest one it lists; returns their names, oldest first, and says so in
    one ``log`` line.

    A driver killed between writing a checkpoint and recording it in the snapshot leaves a folder that
    Ray's ``num_to_keep`` never counts, so it would stay forever. Called after a run ended well, when
    nothing is writing: a folder named after the newest listed one (Ray names them by time) is never
    touched, nor is anything when the snapshot is missing or unreadable. Storage failing here costs
    a ``log`` line, never the run.

    >>> remove_unkept_checkpoints("/nonexistent/train", Storage())
    []
    """
    try:
        snapshot = json.loads(storage.read_text(join_uri(run_dir, RAY_CHECKPOINT_SNAPSHOT)))
        results = list(snapshot.get("checkpoint_results") or [])
        if snapshot.get("latest_checkpoint_result"):
            results.append(snapshot["latest_checkpoint_result"])
        kept = {str(r["checkpoint_dir_name"]) for r in results}
    except (FileNotFoundError, StorageError, ValueError, TypeError, KeyError, AttributeError):
        return []
    if not kept:
        return []
    newest = max(kept)
    removed: list[str] = []
    try:
        for name in checkpoint_folders(run_dir, storage):
            if name not in kept and name < newest:
                storage.delete(join_uri(run_dir, name), recursive=True)
                removed.append(name)
    except (OSError, StorageError) as exc:
        log(f"warning: could not remove the checkpoint folders an interrupted run left in {run_dir}: "
            f"{first_line(exc)}")
    if removed:
        log(f"removed {len(removed)} checkpoint folder{'s' if len(removed) != 1 else ''} that an interrupted run "
            f"left outside Ray Train's {CHECKPOINTS_KEPT} kept ones: {', '.join(removed)}")
    return removed


def failure_line(exc: BaseException, max_failures: int, option: str = "train.max_failures") -> str:
    """One line for a failed Ray Train run: the root cause, not Ray's wrapper around it (``option``: the
    setting that bounds restarts, named in the line)."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, ControllerError):
        cause = exc.controller_failure
        if isinstance(cause, NonRetryableError):
            return str(cause)
        return f"Ray Train's controller failed: {first_line(cause)}"
    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        failures = sorted((rank, _worker_failure(err)) for rank, err in exc.worker_failures.items())
        restarts = f"after {max_failures} restart{'s' if max_failures != 1 else ''} ({option})"
        for rank, err in failures:  # a dead worker first: the others' errors (a timed-out collective) follow from it
            if isinstance(err, RayActorError):
                return f"training worker rank {rank} died {restarts}: {first_line(err)}"
        for rank, err in failures:
            if isinstance(err, NonRetryableError):
                return str(err)
        rank, err = failures[0]
        return f"training worker rank {rank} failed {restarts}: {first_line(err)}"
    return first_line(exc)


def _worker_failure(err: BaseException) -> BaseException:
    # a killed worker shows as a failed health check whose cause is the ActorDiedError
    return getattr(err, "health_check_failure", None) or err


def stop_retries_callback():
    """A Ray Train controller callback that ends the run at the first NonRetryableError of a worker.

    Ray Train retries every worker failure up to ``max_failures`` times, each from the latest
    checkpoint; a missing shard or an unreadable checkpoint fails the same way every time, so the
    run would end only minutes later. Raising from the state-update hook makes the controller
    treat it as a controller error, which it does not retry. A worker that died is retried as
    before (the others' errors are then collateral), so killed workers and elastic shrinks resume.
    """
    from ray.exceptions import RayActorError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class StopOnNonRetryable(ControllerCallback):
        def after_controller_state_update(self, previous_state, current_state):
            error = getattr(current_state, "training_failed_error", None)
            if not isinstance(error, WorkerGroupError):
                return
            failures = [_worker_failure(e) for e in error.worker_failures.values()]
            if any(isinstance(e, RayActorError) for e in failures):
                return
            for e in failures:
                if isinstance(e, NonRetryableError):
                    raise e

    return StopOnNonRetryable()


def workers_use_gpus(rinfo, job: str) -> bool:
    """Whether each training worker takes a GPU: when the Ray cluster has GPUs.

    Embedded, the workers run this process' torch on this machine: GPUs that this torch cannot use
    (a CPU build of torch on a GPU machine) are one clear error here, not an NCCL traceback from the
    first worker ("Distributed package doesn't have NCCL built in"). On a cluster the driver may sit
    on a CPU node, so the workers' torch is not checked from here.
    """
    if rinfo.gpus <= 0:
        return False
    if rinfo.embedded:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"Ray sees {rinfo.gpus:g} GPU(s) on this machine but torch {torch.__version__} cannot "
                              f"use CUDA: install a CUDA build of torch, or set ray.num_gpus=0 to {job} on the CPUs")
    return True


def scaling_config(lo: int, hi: int, use_gpu: bool, resources: dict[str, float], monitor_s: float):
    from ray.train import ScalingConfig

    if lo == hi:
        return ScalingConfig(num_workers=lo, use_gpu=use_gpu, resources_per_worker=resources)
    return ScalingConfig(num_workers=(lo, hi), use_gpu=use_gpu, resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=monitor_s)
