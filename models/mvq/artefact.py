"""The versioned codebook artefact: two objects under one URI prefix.

Layout (``uri`` is a local directory, ``file://`` or ``s3://`` prefix)::

    <uri>/codebooks.safetensors   tensors: codebooks [C, K, D], mean [D], std [D] (float32);
                                  the safetensors header metadata repeats the version
    <uri>/meta.json               JSON metadata (below); written last, so its presence marks a
                                  complete artefact

``meta.json`` holds: ``format`` / ``format_version``, ``version`` (the content hash),
``teacher_id``, ``layer``, ``dim``, ``num_codebooks``, ``codebook_size``, ``normalize``,
``encoder`` (the search settings that define the codes), ``training_frames``,
``train_relative_loss``, ``heldout_frames``, ``heldout_relative_loss`` (None when no held-out
frames were given), ``perplexity`` (per codebook), ``created_at`` (UTC ISO 8601), ``fit``
(fitting settings and time) and ``extra`` (free-form, JSON-serialisable).

The version is ``sha256`` over the tensor bytes and the fields that change what a token means
(:data:`HASHED_FIELDS`): two fits that produce the same codebooks have the same version, and a
token stream is decodable exactly by the artefact whose version it carries.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spear.cluster.storage import Storage, join_uri

FORMAT = "spear-mvq-codebooks"
FORMAT_VERSION = 1
TENSORS_NAME = "codebooks.safetensors"
META_NAME = "meta.json"
# The metadata fields that enter the content hash (besides the tensors).
HASHED_FIELDS = ("format_version", "teacher_id", "layer", "dim", "num_codebooks", "codebook_size", "normalize",
                 "encoder")


class ArtefactError(ValueError):
    """A codebook artefact is incomplete, corrupt, or not the one the caller needs."""


def content_hash(codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, meta: dict[str, Any]) -> str:
    """sha256 hex digest over the key metadata fields (canonical JSON) and the float32 tensor bytes."""
    h = hashlib.sha256()
    key = {k: meta.get(k) for k in HASHED_FIELDS}
    h.update(json.dumps(key, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name, t in (("codebooks", codebooks), ("mean", mean), ("std", std)):
        arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(name.encode("ascii"))
        h.update(repr(tuple(arr.shape)).encode("ascii"))
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def write_artefact(uri: str, codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, meta: dict[str, Any],
                   storage: Optional[Storage] = None) -> None:
    """Write tensors then metadata (each object atomically). ``meta['version']`` must be set."""
    storage = storage or Storage()
    tensors = {
        "codebooks": codebooks.detach().to("cpu", torch.float32).contiguous(),
        "mean": mean.detach().to("cpu", torch.float32).contiguous(),
        "std": std.detach().to("cpu", torch.float32).contiguous(),
    }
    blob = st_save(tensors, metadata={"format": FORMAT, "version": meta["version"]})
    storage.write_bytes(join_uri(uri, TENSORS_NAME), blob)
    storage.write_text(join_uri(uri, META_NAME), json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_artefact(uri: str, storage: Optional[Storage] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify an artefact: returns (tensors, meta). Raises :class:`ArtefactError` when the
    objects are missing, of another format, shaped unlike the metadata, or fail the content hash."""
    storage = storage or Storage()
    meta_uri, tensors_uri = join_uri(uri, META_NAME), join_uri(uri, TENSORS_NAME)
    try:
        meta = json.loads(storage.read_text(meta_uri))
    except FileNotFoundError:
        raise ArtefactError(f"no MVQ codebook artefact at {uri}: {META_NAME} is missing") from None
    except json.JSONDecodeError as exc:
        raise ArtefactError(f"{meta_uri} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtefactError(f"{meta_uri} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ArtefactError(f"{meta_uri} is not an MVQ codebook artefact (format {meta.get('format')!r} "
                            f"where {FORMAT!r} was expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtefactError(f"{uri} has format_version {meta.get('format_version')!r}; "
                            f"this code reads {FORMAT_VERSION}")
    try:
        blob = storage.read_bytes(tensors_uri)
    except FileNotFoundError:
        raise ArtefactError(f"incomplete MVQ artefact at {uri}: {TENSORS_NAME} is missing") from None
    try:
        tensors = st_load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtefactError(f"{tensors_uri} is not a readable safetensors file: {exc}") from None
    M, K, D = meta.get("num_codebooks"), meta.get("codebook_size"), meta.get("dim")
    expected = {"codebooks": (M, K, D), "mean": (D,), "std": (D,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise ArtefactError(f"{tensors_uri} lacks the tensor {name!r}")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ArtefactError(f"{tensors_uri}: tensor {name!r} has shape {list(got)} but {META_NAME} says "
                                f"{list(shape)} (num_codebooks={M}, codebook_size={K}, dim={D})")
        if tensors[name].dtype != torch.float32:
            raise ArtefactError(f"{tensors_uri}: tensor {name!r} is {tensors[name].dtype}, expected float32")
    digest = content_hash(tensors["codebooks"], tensors["mean"], tensors["std"], meta)
    if digest != meta.get("version"):
        raise ArtefactError(f"MVQ artefact at {uri} fails its content hash: computed {digest[:16]}..., "
                            f"{META_NAME} says {str(meta.get('version'))[:16]}... (modified or mixed objects)")
    return tensors, meta
