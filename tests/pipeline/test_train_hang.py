"""Training never hangs and fails in one line: more workers than shard files, a domain on some ranks only,
a missing shard, an unreadable checkpoint, a collective that waits too long."""

from __future__ import annotations

import json
import os

import pytest

from spear.cluster.storage import Storage, join_uri
from spear.config import ConfigError, load_config
from spear.pipeline.train_job import TrainError, checkpoints, run_train
from spear.stages.train_data import StreamState

from support.shards import make_token_store

pytestmark = pytest.mark.slow

TINY = ["train.batch_seconds=6", "train.warmup_steps=1", "train.checkpoint_every=2", "train.student.size=tiny",
        "train.cpus_per_worker=0.5", "train.collective_timeout_s=60"]


def _cfg(shards, out, steps, extra=()):
    return load_config(None, [f"train.shards={shards}", f"output={out}", f"train.max_steps={steps}"] + TINY
                       + list(extra))


def _rank_states(out):
    st = Storage()
    _, uri = checkpoints(out, st)[-1]
    return json.loads(st.read_text(join_uri(uri, "train_state.json")))["data_states"]


def test_two_workers_on_one_shard_file_train_to_the_end(ray_cluster, tmp_path):
    shards = str(tmp_path / "shards")
    store = make_token_store(Storage(), shards, n_speech=10, n_audio=6, rows_per_shard=100)
    assert len(store.shard_files()) == 1
    out = str(tmp_path / "out")
    s = run_train(_cfg(shards, out, 4, ["train.workers=[2, 2]"]), progress=False)
    assert s.step == 4 and s.world_sizes == [2]
    states = _rank_states(out)
    assert len(states) == 2
    for rank, state in enumerate(states):  # each rank was given its own half of the one file's rows
        for domain, n in (("speech", 10), ("audio", 6)):
            st = StreamState.from_dict(state["streams"][domain])
            assert (st.rank, st.world_size) == (rank, 2) and sum(b - a for a, b in st.part()) == n // 2


def test_a_domain_on_one_rank_only_trains_on_both(ray_cluster, tmp_path):
    shards = str(tmp_path / "shards")
    make_token_store(Storage(), shards, n_speech=8, n_audio=1, rows_per_shard=4, seed=3)
    out = str(tmp_path / "out")
    s = run_train(_cfg(shards, out, 4, ["train.workers=[2, 2]"]), progress=False)
    assert s.step == 4
    audio = [StreamState.from_dict(st["streams"]["audio"]) for st in _rank_states(out)]
    assert audio[0].part() == [[0, 1]] and audio[1].part() == []  # the one audio row: rank 0's; rank 1 speech only


def test_more_workers_than_rows_is_refused_before_ray_starts(tmp_path):
    shards = str(tmp_path / "shards")
    make_token_store(Storage(), shards, n_speech=1, n_audio=1, rows_per_shard=4)
    with pytest.raises(ConfigError) as err:
        run_train(_cfg(shards, str(tmp_path / "out"), 4, ["train.workers=[2, 2]"]), progress=False)
    assert "\n" not in str(err.value) and "at most 1 worker" in str(err.value)


def test_a_missing_shard_file_fails_at_once_in_one_line(tmp_path):
    shards = str(tmp_path / "shards")
    store = make_token_store(Storage(), shards, n_speech=6, n_audio=2, rows_per_shard=3)
    gone = store.shard_files()[-1]
    os.remove(gone)
    with pytest.raises(TrainError) as err:
        run_train(_cfg(shards, str(tmp_path / "out"), 4), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and gone in msg and "missing" in msg


def test_an_unreadable_checkpoint_ends_the_run_without_retries(ray_cluster, tmp_path):
    from ray.train import ControllerError

    shards = str(tmp_path / "shards")
    make_token_store(Storage(), shards, n_speech=6, n_audio=2, rows_per_shard=3)
    out = str(tmp_path / "out")
    assert run_train(_cfg(shards, out, 2), progress=False).step == 2
    _, ckpt = checkpoints(out, Storage())[-1]
    model = os.path.join(ckpt, "model.pt")
    size = os.path.getsize(model)
    with open(model, "wb") as f:  # damaged, at its recorded size: a complete checkpoint that cannot be read
        f.write(b"not a torch file".ljust(size, b"\0"))
    with pytest.raises(TrainError) as err:
        run_train(_cfg(shards, out, 4, ["train.max_failures=3"]), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint" in msg and os.path.basename(ckpt) in msg, msg
    # ended by the controller on the first failure, not by running out of max_failures retries
    assert isinstance(err.value.__cause__, ControllerError), repr(err.value.__cause__)


def _stalled_peer(rank, port, result):
    import datetime
    import time

    import torch.distributed as dist

    from spear.stages.train_loop import HAS_TARGETS, NonRetryableError, agree_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=3))
    try:
        if rank == 1:
            time.sleep(8)  # stuck, e.g. on a storage read: never joins the step agreement in time
            return
        try:
            agree_step(HAS_TARGETS, 0, 2, "cpu", 6, 3)
            result.put("no error")
        except NonRetryableError as exc:
            result.put(str(exc))
    finally:
        dist.destroy_process_group()


def test_a_step_agreement_that_waits_too_long_names_the_rank():
    import multiprocessing as mp

    from spear.cluster.local_s3 import free_port

    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_stalled_peer, args=(r, port, result)) for r in range(2)]
    for p in procs:
        p.start()
    msg = result.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert "\n" not in msg and msg.startswith("rank 0 of 2 waited more than 3 s") and "before step 7" in msg, msg


def test_two_workers_train_on_the_demo_tokens(demo_tokens, tmp_path):
    """The issue's case: `spear train --workers 2:2` on the demo token dataset (one shard file) made no step."""
    _, tokens_uri, _ = demo_tokens
    s = run_train(_cfg(tokens_uri, str(tmp_path / "out"), 4, ["train.workers=[2, 2]", "train.batch_seconds=8"]),
                  progress=False)
    assert s.step == 4 and s.world_sizes == [2]


def test_a_worker_killed_more_than_max_failures_times_ends_in_one_line(ray_cluster, tmp_path):
    import signal
    import threading
    import time

    from spear.pipeline.train_job import worker_group_starts

    shards = str(tmp_path / "shards")
    make_token_store(Storage(), shards, n_speech=6, n_audio=2, rows_per_shard=3)
    out = str(tmp_path / "out")
    result: dict = {}

    def train():
        try:
            run_train(_cfg(shards, out, 100000, ["train.max_failures=1"]), progress=False)
        except TrainError as exc:
            result["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    killed: list[int] = []
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        starts = worker_group_starts(out, Storage())
        if len(starts) > len(killed):  # a new worker group (the first, then the restart): kill its rank 0
            killed.append(starts[-1]["pid"])
            os.kill(killed[-1], signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=120)
    assert len(killed) == 2 and "error" in result, (killed, result)
    msg = str(result["error"])
    assert "\n" not in msg and msg.startswith("training worker rank 0 died after 1 restart (train.max_failures)"), msg
