"""An exported student: a folder of safetensors weights and a JSON config, no pickle.

Layout (a local directory, ``file://`` or ``s3://`` prefix)::

    <dir>/model.safetensors   the encoder's weights (float32 unless exported otherwise); the
                              header metadata holds format and format_version
    <dir>/config.json         written last, so a folder with a config.json holds complete weights

``config.json`` holds ``format`` ("spear-student"), ``format_version``, ``encoder``
(architecture + config), ``frontend`` (Kaldi fbank settings), ``frame_rate``, ``layer_dims``,
``output_dim``, ``num_parameters``, ``weights_sha256`` (of the weights file) and ``metadata``
(free-form: training step, token versions, ...).

This module turns weights and config into those files' contents and back, checking what it
reads; :mod:`spear.models.student.export` builds the model from them and
:mod:`spear.stages.artefacts` moves the files to and from storage.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from spear.schemas import student_export as schema
    >>> blob, config = schema.encode_export({"w": torch.ones(2)}, {"frame_rate": 50.0}, {"step": 1})
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / schema.WEIGHTS_FILE).write_bytes(blob), (d / schema.CONFIG_FILE).write_text(schema.encode_config(config))
    >>> config2, state = schema.read_export(d, where=str(d))
    >>> config2 == config, state["w"].tolist()
    (True, [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file

from spear.schemas.tensor_file import save_tensors
from spear.schemas.versioning import FormatError, check_version, parse_json_object

FORMAT = "spear-student"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: The files of an export, in write order (the config last).
FILES = (WEIGHTS_FILE, CONFIG_FILE)


def encode_export(state: Mapping[str, torch.Tensor], fields: Mapping[str, Any],
                  metadata: Optional[Mapping[str, Any]] = None) -> tuple[bytes, dict[str, Any]]:
    """(``model.safetensors`` bytes, the config) for weights ``state`` and the model's config ``fields``
    (``encoder``, ``frontend``, ``frame_rate``, ...); ``metadata`` is stored as is."""
    blob = save_tensors(state, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields,
              "weights_sha256": hashlib.sha256(blob).hexdigest(), "metadata": dict(metadata or {})}
    return blob, config


def encode_config(config: Mapping[str, Any]) -> str:
    """``config.json``'s text."""
    return json.dumps(config, indent=2, sort_keys=True)


def decode_config(text: str, where: str) -> dict[str, Any]:
    """The config of ``config.json`` (``where`` names it in errors).

    Raises :class:`~spear.schemas.versioning.FormatError` (a ValueError) for invalid JSON, another
    format or a format version newer than this code reads.
    """
    config = parse_json_object(f"{where}: {CONFIG_FILE}", text)
    if config.get("format") != FORMAT:
        raise FormatError(f"{where}: not a SPEAR student export (format {config.get('format')!r})")
    check_version(f"student export {where}", config.get("format_version", 1), FORMAT_VERSION)
    return config


def read_export(local_dir: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, weights) of the export in the local folder ``local_dir`` (``where`` names it in errors).

    The weights are read with safetensors (memory-mapped; nothing executes from the files).
    Raises FileNotFoundError when a file is missing and FormatError as :func:`decode_config`.
    """
    cfg_path, weights_path = Path(local_dir) / CONFIG_FILE, Path(local_dir) / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{where}: an exported student needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = decode_config(cfg_path.read_text(), where)
    return config, load_file(str(weights_path))
