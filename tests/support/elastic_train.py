"""Run an elastic training job on a multi-node `ray.cluster_utils.Cluster`: grow 1 -> 2 nodes, shrink back.

Run as a script (its own process: the test session already has a Ray connection):
    python elastic_train.py SHARDS OUTPUT                       (spear train)
    python elastic_train.py --posttrain OUTPUT SETS_JSON        (spear posttrain: the --set list of its model, data
                                                                 and sizes; tests/pipeline/test_posttrain_job.py)
Prints one JSON line: the job's summary plus the node events.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(shards: str, output: str, posttrain_sets: list[str] | None = None) -> None:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster

    from spear.cluster.local_s3 import free_port
    from spear.cluster.storage import Storage
    from spear.config import load_config
    from spear.pipeline.train_job import checkpoints, run_train, worker_group_starts

    temp = tempfile.mkdtemp(prefix="spear-elastic-")
    # cluster_utils records "the current cluster" under Ray's default temp root: make that root private
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    dash = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    # one CPU per node and one CPU per worker: the worker count follows the node count
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp, "include_dashboard": True,
                                                            "dashboard_port": dash, "dashboard_host": "127.0.0.1"})
    ray.init(address=cluster.address)
    if posttrain_sets is None:
        cfg = load_config(None, [f"train.shards={shards}", f"output={output}", "train.max_steps=40",
                                 "train.checkpoint_every=2", "train.batch_seconds=6", "train.warmup_steps=2",
                                 "train.workers=[1, 2]", "train.cpus_per_worker=1", "train.elastic_monitor_s=2",
                                 "train.max_failures=5"])
        run, runs_root = run_train, output
    else:
        from spear.cluster.storage import join_uri
        from spear.pipeline.posttrain_job import run_posttrain

        cfg = load_config(None, posttrain_sets + [f"output={output}", "posttrain.workers=[1, 2]",
                                                  "posttrain.cpus_per_worker=1", "posttrain.elastic_monitor_s=2",
                                                  "posttrain.max_failures=5"])
        run, runs_root = run_posttrain, join_uri(output, "posttrain")
    result: dict = {}

    def fit():
        try:
            result["summary"] = run(cfg, progress=False).to_dict()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = repr(exc)

    st = Storage()
    events = []
    thread = threading.Thread(target=fit)
    thread.start()

    def wait_for(pred, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and thread.is_alive():
            if pred():
                return True
            time.sleep(0.5)
        return False

    def world_sizes():
        return [e["world_size"] for e in worker_group_starts(runs_root, st)]

    wait_for(lambda: len(checkpoints(runs_root, st)) >= 2)
    node = cluster.add_node(num_cpus=1)  # main thread: cluster_utils requires it
    events.append(("add_node", checkpoints(runs_root, st)[-1][0]))
    grew = wait_for(lambda: 2 in world_sizes())
    events.append(("grew", grew, world_sizes()))
    cluster.remove_node(node)
    events.append(("remove_node", checkpoints(runs_root, st)[-1][0]))
    thread.join(timeout=600)
    print(json.dumps({"result": result, "events": events}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "--posttrain":
        main("", sys.argv[2], posttrain_sets=json.loads(sys.argv[3]))
    else:
        main(sys.argv[1], sys.argv[2])
