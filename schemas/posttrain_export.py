"""A post-trained model: a student export plus the attribute heads, safetensors and JSON, no pickle.

Layout (a local directory, ``file://`` or ``s3://`` prefix)::

    <dir>/model.safetensors       the encoder (as :mod:`spear.schemas.student_export`: the folder is a
    <dir>/config.json             student export too, so every student reader takes it)
    <dir>/posttrain.safetensors   the heads and losses (``PostTrainModel.heads_state_dict()``: ``heads.*``,
                                  ``losses.*``); the header metadata holds format and format_version
    <dir>/posttrain.json          written last: ``format`` ("spear-posttrained"), ``format_version``,
                                  ``model`` (``PostTrainModel.config()``: attributes, freeze,
                                  trainable_layers, input_layer), ``heads_sha256`` and ``metadata``
                                  (free-form: speakers, languages, target info, input model, step)

A folder with ``posttrain.json`` holds complete weights. This module turns heads and config into
those files' contents and back, checking what it reads; :mod:`spear.stages.artefacts` moves them.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from spear.schemas import posttrain_export as schema
    >>> blob, config = schema.encode_heads({"heads.w": torch.ones(2)}, {"attributes": []}, {"step": 3})
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / schema.HEADS_FILE).write_bytes(blob), (d / schema.CONFIG_FILE).write_text(schema.encode_config(config))
    >>> config2, heads = schema.read_heads(d, where=str(d))
    >>> config2["metadata"], heads["heads.w"].tolist(), schema.is_posttrained(d)
    ({'step': 3}, [1.0, 1.0], True)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file

from spear.schemas import student_export
from spear.schemas.tensor_file import save_tensors
from spear.schemas.versioning import FormatError, check_version, parse_json_object

FORMAT = "spear-posttrained"
FORMAT_VERSION = 1
HEADS_FILE = "posttrain.safetensors"
CONFIG_FILE = "posttrain.json"
#: Every file of a post-trained export, in write order (``posttrain.json`` last).
FILES = student_export.FILES + (HEADS_FILE, CONFIG_FILE)


def encode_heads(state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any],
                 metadata: Optional[Mapping[str, Any]] = None) -> tuple[bytes, dict[str, Any]]:
    """(``posttrain.safetensors`` bytes, ``posttrain.json``'s object) for the heads' weights ``state`` and
    the model's :meth:`~spear.models.posttrain.PostTrainModel.config`; ``metadata`` is stored as is."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    blob = save_tensors(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dict(model_config),
              "heads_sha256": hashlib.sha256(blob).hexdigest(), "metadata": dict(metadata or {})}
    return blob, config


def encode_config(config: Mapping[str, Any]) -> str:
    """``posttrain.json``'s text. Keys keep their order: a counting attribute's ``tasks`` order is its
    task index order."""
    return json.dumps(config, indent=2)


def decode_config(text: str, where: str) -> dict[str, Any]:
    """The object of ``posttrain.json`` (``where`` names it in errors). Raises
    :class:`~spear.schemas.versioning.FormatError` for invalid JSON, another format or a newer version."""
    config = parse_json_object(f"{where}: {CONFIG_FILE}", text)
    if config.get("format") != FORMAT:
        raise FormatError(f"{where}: not a post-trained SPEAR export (format {config.get('format')!r})")
    check_version(f"post-trained export {where}", config.get("format_version", 1), FORMAT_VERSION)
    if not isinstance(config.get("model"), dict) or not isinstance(config["model"].get("attributes"), list):
        raise FormatError(f"{where}: {CONFIG_FILE} has no model.attributes")
    return config


def read_heads(local_dir: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``posttrain.json``'s object, the heads' weights) in the local folder ``local_dir``.

    Raises FileNotFoundError when a file is missing, FormatError as :func:`decode_config` or when the
    weights' hash differs from the one recorded (a mixed or modified folder).
    """
    cfg_path, heads_path = Path(local_dir) / CONFIG_FILE, Path(local_dir) / HEADS_FILE
    if not cfg_path.is_file() or not heads_path.is_file():
        raise FileNotFoundError(f"{where}: a post-trained export needs {CONFIG_FILE} and {HEADS_FILE}")
    config = decode_config(cfg_path.read_text(), where)
    blob = heads_path.read_bytes()
    if config.get("heads_sha256") and hashlib.sha256(blob).hexdigest() != config["heads_sha256"]:
        raise FormatError(f"{where}: {HEADS_FILE} does not match the hash in {CONFIG_FILE} (modified or mixed files)")
    return config, load_file(str(heads_path))


def is_posttrained(local_dir: Path) -> bool:
    """Whether a local folder holds a post-trained export (its ``posttrain.json`` names this format)."""
    cfg = Path(local_dir) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except ValueError:
        return False
