"""Where computation runs when the caller does not say.

Example::

    >>> from spear.models.device import default_device
    >>> default_device().type in ("cuda", "cpu")
    True
    >>> process_cpus() >= 1
    True
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible to this process, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def process_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int], *, faiss: bool = False) -> Iterator[None]:
    """Run torch (and faiss' OpenMP, with ``faiss=True`` where it is installed) on ``num_threads`` intra-op
    threads inside the block and give the caller its own settings back after it; None or 0 changes nothing.

    Results whose float reductions follow the thread count (codebook fits, probes) fix it here, so they do
    not depend on what the calling process was left on.
    """
    if not num_threads:
        yield
        return
    faiss_module = None
    if faiss:
        try:
            import faiss as faiss_module  # optional: GPU machines may have no faiss wheel
        except ImportError:
            pass
    # both read before either is set: torch and faiss may share one OpenMP runtime, so setting torch first
    # made faiss' "old" value the new one, and restoring it last left the caller on num_threads
    old = torch.get_num_threads()
    old_faiss = faiss_module.omp_get_max_threads() if faiss_module is not None else 0
    torch.set_num_threads(int(num_threads))
    if faiss_module is not None:
        faiss_module.omp_set_num_threads(int(num_threads))
    try:
        yield
    finally:
        if faiss_module is not None:
            faiss_module.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old)
