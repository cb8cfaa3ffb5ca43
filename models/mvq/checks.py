"""Checks of what a quantiser is given: frames as float tensors without NaN or inf, a codebook size tokens fit.

Example::

    >>> import numpy as np
    >>> from spear.models.mvq.checks import as_float_tensor, check_finite
    >>> x = as_float_tensor(np.ones((2, 3), np.float32), "frames")
    >>> check_finite(x, "frames")
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_float_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    """``x`` as a floating-point torch tensor (numpy arrays are wrapped, not copied when contiguous)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}")
    return x


def check_finite(x: torch.Tensor, what: str) -> None:
    """ValueError naming the rows of ``x`` [..., D] that hold NaN or inf."""
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        rows = torch.nonzero(bad.reshape(-1)).flatten()
        raise ValueError(f"{what}: {rows.numel()} of {bad.numel()} rows contain NaN or inf values "
                         f"(first bad row: {int(rows[0])}); drop or repair them before quantising")


def check_codebook_size(k: int) -> None:
    """ValueError unless ``k`` is a power of two in 2..256 (tokens are uint8)."""
    if not isinstance(k, (int, np.integer)) or k < 2 or k > 256 or (k & (k - 1)):
        raise ValueError(f"codebook_size must be a power of two between 2 and 256 (tokens are uint8), got {k!r}")
