"""Connecting to Ray: one code path for an embedded local Ray and an existing cluster.

Embedded Ray gets a private temp dir, token auth off, a free dashboard port (which
Train V2's controller needs, see ENVIRONMENT.md) and the machine's resources; it is
shut down and its temp dir removed on exit. An address (``ray.address`` in the config,
``--address`` or ``RAY_ADDRESS``) connects to a running cluster instead.

Example::

    from spear.cluster.ray_runtime import ray_session
    from spear.pipeline.config import RayConfig
    with ray_session(RayConfig(num_cpus=2)) as info:
        print(info.cpus, info.gpus, info.embedded)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

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


class RayConnectionError(RuntimeError):
    """The configured Ray cluster cannot be reached."""


def _info(embedded: bool, dashboard_url: Optional[str]) -> RayInfo:
    import ray

    res = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    return RayInfo(embedded=embedded, address=ctx.gcs_address, cpus=float(res.get("CPU", 0.0)),
                   gpus=float(res.get("GPU", 0.0)), nodes=len([n for n in ray.nodes() if n.get("Alive")]),
                   dashboard_url=dashboard_url)


@contextmanager
def ray_session(cfg=None, *, quiet: bool = True) -> Iterator[RayInfo]:
    """Connect to (or start) Ray for the duration of the block.

    If Ray is already initialised in this process (tests, notebooks, a Ray Job driver
    that was started by ``ray job submit``), that connection is used and left open.
    """
    import ray

    if ray.is_initialized():
        yield _info(embedded=False, dashboard_url=None)
        return

    address = (getattr(cfg, "address", None) if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING if quiet else logging.INFO,
                     log_to_driver=True)
        except Exception as exc:  # noqa: BLE001 - reported as one clear line
            raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        try:
            yield _info(embedded=False, dashboard_url=None)
        finally:
            ray.shutdown()
        return

    own_temp = getattr(cfg, "temp_dir", None) is None
    temp_dir = getattr(cfg, "temp_dir", None) or tempfile.mkdtemp(prefix="spear-ray-")
    dashboard_port = getattr(cfg, "dashboard_port", None) or free_port()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Train V2's controller finds the dashboard through this variable (never a neighbour's cluster).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    kwargs = dict(
        address="local",
        num_cpus=getattr(cfg, "num_cpus", None) or os.cpu_count(),
        _temp_dir=temp_dir,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )
    if getattr(cfg, "num_gpus", None) is not None:
        kwargs["num_gpus"] = cfg.num_gpus
    if getattr(cfg, "object_store_memory_mb", None):
        kwargs["object_store_memory"] = int(cfg.object_store_memory_mb) * 1024 * 1024
    ray.init(**kwargs)
    try:
        yield _info(embedded=True, dashboard_url=f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        if own_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)
