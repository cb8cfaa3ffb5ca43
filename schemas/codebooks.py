"""The versioned MVQ codebook artefact: two objects under one folder (URI prefix).

Layout (``uri`` is a local directory, ``file://`` or ``s3://`` prefix)::

    <uri>/codebooks.safetensors   tensors: codebooks [C, K, D], mean [D], std [D] (float32);
                                  the safetensors header metadata repeats format and version
    <uri>/meta.json               JSON metadata (below); written last, so its presence marks a
                                  complete artefact

``meta.json`` holds: ``format`` / ``format_version``, ``version`` (the content hash,
:func:`spear.models.mvq.version.content_hash`), ``teacher_id``, ``layer``, ``dim``,
``num_codebooks``, ``codebook_size``, ``normalize``, ``encoder`` (the search settings that
define the codes), ``training_frames``, ``validation_frames``, ``train_relative_loss``,
``validation_relative_loss``, ``heldout_frames``, ``heldout_relative_loss`` (None when no
held-out frames were given), ``perplexity`` (per codebook), ``created_at`` (UTC ISO 8601),
``fit`` (fitting settings and time) and ``extra`` (free-form, JSON-serialisable).

This module turns the quantiser's tensors and metadata into those objects' bytes and back,
checking what it reads; :mod:`spear.stages.artefacts` moves the bytes to and from storage.

Example::

    >>> import torch
    >>> from spear.schemas import codebooks as schema
    >>> meta = {"version": "0" * 64, "dim": 2, "num_codebooks": 1, "codebook_size": 2}
    >>> blob = schema.encode_tensors(torch.zeros(1, 2, 2), torch.zeros(2), torch.ones(2), meta["version"])
    >>> text = schema.encode_meta(meta)
    >>> back = schema.decode_meta(text, "mem://cb")
    >>> back == meta, sorted(schema.decode_tensors(blob, back, "mem://cb"))
    (True, ['codebooks', 'mean', 'std'])
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load

from spear.schemas.tensor_file import save_tensors
from spear.schemas.versioning import FormatError, check_version, parse_json_object

FORMAT = "spear-mvq-codebooks"
FORMAT_VERSION = 1
TENSORS_NAME = "codebooks.safetensors"
META_NAME = "meta.json"
#: The objects in write order: the metadata last marks a complete artefact.
FILES = (TENSORS_NAME, META_NAME)
_TENSORS = ("codebooks", "mean", "std")


class ArtefactError(FormatError):
    """A codebook artefact is incomplete, corrupt, or not the one the caller needs."""


def encode_tensors(codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, version: str) -> bytes:
    """``codebooks.safetensors``: the three tensors as contiguous CPU float32."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in zip(_TENSORS, (codebooks, mean, std))}
    return save_tensors(tensors, metadata={"format": FORMAT, "version": version})


def encode_meta(meta: Mapping[str, Any]) -> str:
    """``meta.json``: the quantiser's metadata (which carries ``version``) with ``format`` / ``format_version``."""
    if not meta.get("version"):
        raise ValueError("codebook metadata needs its version (the content hash) before it is written")
    return json.dumps({**meta, "format": FORMAT, "format_version": FORMAT_VERSION}, indent=2, sort_keys=True) + "\n"


def decode_meta(text: str, where: str) -> dict[str, Any]:
    """The metadata of ``meta.json`` (``where`` names it in errors), without ``format`` / ``format_version``.

    Raises :class:`ArtefactError` for invalid JSON or another format, and
    :class:`~spear.schemas.versioning.FormatError` for a format version this code does not read.
    """
    meta = parse_json_object(where, text, ArtefactError)
    if meta.get("format") != FORMAT:
        raise ArtefactError(f"{where} is not an MVQ codebook artefact (format {meta.get('format')!r} "
                            f"where {FORMAT!r} was expected)")
    check_version(where, meta.get("format_version"), FORMAT_VERSION)
    return {k: v for k, v in meta.items() if k not in ("format", "format_version")}


def decode_tensors(blob: bytes, meta: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The tensors of ``codebooks.safetensors``, checked against the shapes ``meta`` gives.

    Raises :class:`ArtefactError` for unreadable bytes, a missing tensor, a shape unlike the
    metadata's or a dtype other than float32.
    """
    try:
        tensors = st_load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtefactError(f"{where} is not a readable safetensors file: {exc}") from None
    M, K, D = meta.get("num_codebooks"), meta.get("codebook_size"), meta.get("dim")
    expected = {"codebooks": (M, K, D), "mean": (D,), "std": (D,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise ArtefactError(f"{where} lacks the tensor {name!r}")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ArtefactError(f"{where}: tensor {name!r} has shape {list(got)} but {META_NAME} says "
                                f"{list(shape)} (num_codebooks={M}, codebook_size={K}, dim={D})")
        if tensors[name].dtype != torch.float32:
            raise ArtefactError(f"{where}: tensor {name!r} is {tensors[name].dtype}, expected float32")
    return tensors
