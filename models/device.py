"""Where computation runs when the caller does not say.

Example::

    >>> from spear.models.device import default_device
    >>> default_device().type in ("cuda", "cpu")
    True
    >>> process_cpus() >= 1
    True
"""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible to this process, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def process_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
