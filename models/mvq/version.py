"""The version of a set of codebooks: a content hash of what defines the codes.

``sha256`` over the tensors (codebooks, normalisation mean and std, as float32 bytes) and the
metadata fields that change what a token means (:data:`HASHED_FIELDS`). Two fits that produce
the same codebooks have the same version, and a token stream is decodable exactly by the
codebooks whose version it carries. Artefacts of different teachers never share one
(``teacher_id`` and ``layer`` are hashed).

Example::

    >>> import torch
    >>> from spear.models.mvq.version import content_hash
    >>> meta = {"dim": 2, "num_codebooks": 1, "codebook_size": 2, "normalize": True}
    >>> v = content_hash(torch.zeros(1, 2, 2), torch.zeros(2), torch.ones(2), meta)
    >>> len(v), v == content_hash(torch.zeros(1, 2, 2), torch.zeros(2), torch.ones(2), {**meta, "extra": 1})
    (64, True)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

#: The metadata fields that enter the content hash (besides the tensors).
HASHED_FIELDS = ("teacher_id", "layer", "dim", "num_codebooks", "codebook_size", "normalize", "encoder")
# Hashed under "format_version": the codebook artefact format the hash was defined with. Fixed
# here so a version never changes with the storage layout; raise it only when codes change meaning.
HASH_FORMAT_VERSION = 1


def content_hash(codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, meta: Mapping[str, Any]) -> str:
    """sha256 hex digest over the key metadata fields (canonical JSON) and the float32 tensor bytes."""
    h = hashlib.sha256()
    key = {"format_version": HASH_FORMAT_VERSION, **{k: meta.get(k) for k in HASHED_FIELDS}}
    h.update(json.dumps(key, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name, t in (("codebooks", codebooks), ("mean", mean), ("std", std)):
        arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(name.encode("ascii"))
        h.update(repr(tuple(arr.shape)).encode("ascii"))
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()
