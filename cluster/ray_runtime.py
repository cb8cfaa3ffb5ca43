"""Connecting to Ray: one code path for an embedded local Ray and an existing cluster.

Embedded Ray gets a private temp dir, token auth off, the machine's resources and only
the parts a one-machine job uses: no metrics export, no usage stats, and the dashboard
only where Ray Train runs (``dashboard=True``, the default: Train V2's placement-group
cleaner asks the State API, which the dashboard process serves, whether the controller is
alive; decode and tokenize need none of it and pass ``dashboard=False``). Start-up is said
on stderr at once ("starting Ray ...") and when done ("Ray ready in X s"); ``bench/startup.py``
measures it. It is shut down and its temp dir removed on exit. An address (``ray.address``
in the config, ``--address`` or ``RAY_ADDRESS``) connects to a running cluster instead.

Example::

    from spear.cluster.ray_runtime import ray_session
    from spear.config import RayConfig
    with ray_session(RayConfig(num_cpus=2)) as info:
        print(info.cpus, info.gpus, info.embedded)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from spear.cluster.console import print_line
from spear.cluster.local_s3 import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayInfo:
    """What the job is running on."""

    embedded: bool
    address: str
    cpus: float
    gpus: float
    nodes: int
    dashboard_url: Optional[str]
    start_seconds: float = 0.0  # starting (embedded) or connecting to Ray; 0 when already connected


class RayConnectionError(RuntimeError):
    """The configured Ray cluster cannot be reached."""


def _info(embedded: bool, dashboard_url: Optional[str], start_seconds: float = 0.0) -> RayInfo:
    import ray

    res = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    return RayInfo(embedded=embedded, address=ctx.gcs_address, cpus=float(res.get("CPU", 0.0)),
                   gpus=float(res.get("GPU", 0.0)), nodes=len([n for n in ray.nodes() if n.get("Alive")]),
                   dashboard_url=dashboard_url, start_seconds=start_seconds)


# Embedded runs: Ray internals no one on one machine reads. Metrics feed a Prometheus that an
# embedded run does not have (on a cluster, `ray start` keeps them); the spear metrics counters
# become no-ops. Worker prestart stays on: turning it off ("prestart_worker_first_driver") only
# moves the same workers' start from ray.init to the first task (bench/startup.py: no change to
# the first task's time). The autoscaler monitor and the log monitor cannot be turned off
# through ray.init.
EMBEDDED_SYSTEM_CONFIG = {"enable_metrics_collection": False}

# The embedded Ray this process started and has not shut down: a session opened inside it (the demo's
# jobs, the tests' shared cluster) runs on that one machine too, and must be told so.
_embedded_here: Optional[RayInfo] = None


class _ProgressBarsOffNotice(logging.Filter):
    """Drops Ray Data's "Progress bars disabled. To enable, set ..." warning: spear turns the bars off itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def ray_data_without_progress_bars() -> None:
    """Ray Data without its progress bars (spear's jobs print their own progress and throughput lines), and
    without the warning it logs once per process to say they are off: it asked users of `spear` to change a
    setting they cannot reach."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logger = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _ProgressBarsOffNotice) for f in logger.filters):
        logger.addFilter(_ProgressBarsOffNotice())


@contextmanager
def ray_session(cfg=None, *, quiet: bool = True, dashboard: bool = True,
                announce: Optional[Callable[[str], None]] = print_line) -> Iterator[RayInfo]:
    """Connect to (or start) Ray for the duration of the block.

    If Ray is already initialised in this process (tests, notebooks, a Ray Job driver
    that was started by ``ray job submit``), that connection is used and left open; it counts as
    embedded only when an outer ``ray_session`` of this process started it.
    ``dashboard``: start the embedded Ray's dashboard (the State API Ray Train needs);
    ``announce`` gets the start-up lines (None: silent).
    """
    import ray

    global _embedded_here
    if ray.is_initialized():
        outer = _embedded_here
        if outer is not None and outer.address == ray.get_runtime_context().gcs_address:
            yield dataclasses.replace(outer, start_seconds=0.0)
        else:
            yield _info(embedded=False, dashboard_url=None)
        return
    say = announce or (lambda message: None)
    t0 = time.monotonic()

    address = (getattr(cfg, "address", None) if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if address:
        say(f"connecting to Ray at {address} ...")
        try:
            ray.init(address=address, logging_level=logging.WARNING if quiet else logging.INFO,
                     log_to_driver=True)
        except Exception as exc:  # noqa: BLE001 - reported as one clear line
            raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        info = _info(embedded=False, dashboard_url=None, start_seconds=time.monotonic() - t0)
        say(f"Ray connected in {info.start_seconds:.1f} s ({info.nodes} nodes, {info.cpus:g} CPUs, {info.gpus:g} GPUs)")
        try:
            yield info
        finally:
            ray.shutdown()
        return

    own_temp = getattr(cfg, "temp_dir", None) is None
    temp_dir = getattr(cfg, "temp_dir", None) or tempfile.mkdtemp(prefix="spear-ray-")
    dashboard_port = getattr(cfg, "dashboard_port", None) or free_port()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report thread (or its network call)
    if dashboard:
        # Train V2's controller finds the dashboard through this variable (never a neighbour's cluster).
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    num_cpus = getattr(cfg, "num_cpus", None) or os.cpu_count()
    kwargs = dict(
        address="local",
        num_cpus=num_cpus,
        _temp_dir=temp_dir,
        include_dashboard=dashboard,  # False still runs Ray's API server, with no modules but usage stats
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        logging_level=logging.WARNING if quiet else logging.INFO,
        _system_config=dict(EMBEDDED_SYSTEM_CONFIG),
    )
    if getattr(cfg, "num_gpus", None) is not None:
        kwargs["num_gpus"] = cfg.num_gpus
    if getattr(cfg, "object_store_memory_mb", None):
        kwargs["object_store_memory"] = int(cfg.object_store_memory_mb) * 1024 * 1024
    say(f"starting Ray (embedded, {num_cpus} CPUs) ...")
    ray.init(**kwargs)
    info = _info(embedded=True, dashboard_url=f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
                 start_seconds=time.monotonic() - t0)
    say(f"Ray ready in {info.start_seconds:.1f} s")
    _embedded_here = info
    try:
        yield info
    finally:
        _embedded_here = None
        ray.shutdown()
        if own_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)
