"""Where computation runs when the caller does not say.

Example::

    >>> from spear.models.device import default_device
    >>> default_device().type in ("cuda", "cpu")
    True
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible to this process, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
