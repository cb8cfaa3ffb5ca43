"""safetensors files whose bytes depend only on their tensors and metadata.

safetensors writes its ``__metadata__`` map in an order that changes from save to save (a hash
map), so two saves of the same weights differ in their header's bytes, and so does any hash of the
file: two exports of one checkpoint had different ``weights_sha256``. :func:`save_tensors` writes
the header again with its keys sorted. The file reads the same everywhere: the header is JSON and
each tensor is found by its offsets, not by its place in the header.

Example::

    >>> import torch
    >>> tensors = {"b": torch.ones(2), "a": torch.zeros(3)}
    >>> meta = {"format": "x", "format_version": "1", "kind": "y"}
    >>> len({save_tensors(tensors, meta) for _ in range(10)})
    1
"""

from __future__ import annotations

import json
import struct
from typing import Mapping, Optional

import torch
from safetensors.torch import save


def save_tensors(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """``safetensors.torch.save(tensors, metadata)`` with the header's keys in sorted order."""
    blob = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    # The same content in the same compact form has the same length; the header keeps its size (and the
    # data its alignment), padded with spaces as safetensors pads it.
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(canonical) > size:  # not seen; the unsorted file is still a valid one
        return blob
    return blob[:8] + canonical.ljust(size, b" ") + blob[8 + size:]
