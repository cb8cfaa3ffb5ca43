"""The student export format: config and weights round trips, version checks, missing files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from spear.schemas import student_export as schema
from spear.schemas.versioning import FormatError

FIELDS = {"encoder": {"architecture": "transformer", "dim": 8}, "frame_rate": 50.0, "layer_dims": [8, 8]}


def _write(tmp_path, state=None, metadata=None):
    blob, config = schema.encode_export(state or {"w": torch.arange(4.0)}, FIELDS, metadata)
    (tmp_path / schema.WEIGHTS_FILE).write_bytes(blob)
    (tmp_path / schema.CONFIG_FILE).write_text(schema.encode_config(config))
    return blob, config


def test_round_trip(tmp_path):
    import hashlib

    blob, config = _write(tmp_path, metadata={"step": 7})
    assert (config["format"], config["format_version"]) == (schema.FORMAT, schema.FORMAT_VERSION)
    assert config["weights_sha256"] == hashlib.sha256(blob).hexdigest() and config["metadata"] == {"step": 7}
    assert {k: config[k] for k in FIELDS} == FIELDS
    back, state = schema.read_export(tmp_path, where="exp")
    assert back == config and torch.equal(state["w"], torch.arange(4.0))
    with safe_open(str(tmp_path / schema.WEIGHTS_FILE), framework="pt") as f:
        assert f.metadata() == {"format": schema.FORMAT, "format_version": str(schema.FORMAT_VERSION)}


def test_wrong_format_or_version_is_a_clear_error(tmp_path):
    _, config = _write(tmp_path)
    with pytest.raises(FormatError, match="exp: not a SPEAR student export \\(format 'other'\\)"):
        schema.decode_config(json.dumps({**config, "format": "other"}), "exp")
    with pytest.raises(FormatError, match="student export exp is version 2, newer than this spear reads"):
        schema.decode_config(json.dumps({**config, "format_version": 2}), "exp")
    with pytest.raises(FormatError, match="not valid JSON"):
        schema.decode_config("{", "exp")
    # exports from before the field existed read as version 1
    assert schema.decode_config(json.dumps({k: v for k, v in config.items() if k != "format_version"}), "exp")


def test_missing_file_is_named(tmp_path):
    _write(tmp_path)
    (tmp_path / schema.WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="exp: an exported student needs config.json and model.safetensors"):
        schema.read_export(tmp_path, where="exp")
