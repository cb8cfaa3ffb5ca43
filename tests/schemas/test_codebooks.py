"""The MVQ codebook artefact format: bytes and metadata round trips, version and shape checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from spear.models.mvq import MultiCodebookQuantizer
from spear.schemas import codebooks as schema
from spear.schemas.versioning import FormatError
from spear.stages.artefacts import load_quantizer, save_quantizer


def _quantizer() -> MultiCodebookQuantizer:
    g = torch.Generator().manual_seed(0)
    return MultiCodebookQuantizer(torch.randn(2, 4, 3, generator=g), torch.randn(3, generator=g),
                                  torch.rand(3, generator=g) + 0.5, normalize=True, metadata={"teacher_id": "t"},
                                  device="cpu")


def test_meta_and_tensors_round_trip():
    q = _quantizer()
    text = schema.encode_meta(q.metadata)
    stored = json.loads(text)
    assert (stored["format"], stored["format_version"]) == (schema.FORMAT, schema.FORMAT_VERSION)
    assert text.endswith("\n") and list(stored) == sorted(stored)  # stable bytes: sorted keys
    meta = schema.decode_meta(text, "cb/meta.json")
    assert meta == q.metadata  # format fields are the envelope, not the quantiser's metadata
    tensors = schema.decode_tensors(schema.encode_tensors(q.codebooks, q.mean, q.std, q.version), meta, "cb")
    for name, t in (("codebooks", q.codebooks), ("mean", q.mean), ("std", q.std)):
        assert tensors[name].dtype == torch.float32 and torch.equal(tensors[name], t)
    again = MultiCodebookQuantizer.from_state(tensors["codebooks"], tensors["mean"], tensors["std"], meta, device="cpu")
    assert again.version == q.version


def test_safetensors_header_names_format_and_version(tmp_path):
    q = _quantizer()
    (tmp_path / schema.TENSORS_NAME).write_bytes(schema.encode_tensors(q.codebooks, q.mean, q.std, q.version))
    with safe_open(str(tmp_path / schema.TENSORS_NAME), framework="pt") as f:
        assert f.metadata() == {"format": schema.FORMAT, "version": q.version}


def test_wrong_format_or_version_is_a_clear_error():
    text = schema.encode_meta(_quantizer().metadata)
    meta = json.loads(text)
    with pytest.raises(schema.ArtefactError, match="is not an MVQ codebook artefact"):
        schema.decode_meta(json.dumps({**meta, "format": "spear-student"}), "x/meta.json")
    with pytest.raises(FormatError, match=r"x/meta.json is version 2, newer than this spear reads \(1 to 1\)"):
        schema.decode_meta(json.dumps({**meta, "format_version": 2}), "x/meta.json")
    with pytest.raises(FormatError, match="has no readable version"):
        schema.decode_meta(json.dumps({k: v for k, v in meta.items() if k != "format_version"}), "x/meta.json")
    with pytest.raises(schema.ArtefactError, match="not valid JSON"):
        schema.decode_meta("{", "x/meta.json")
    with pytest.raises(ValueError, match="needs its version"):
        schema.encode_meta({k: v for k, v in meta.items() if k != "version"})


def test_tensors_must_match_the_metadata():
    q = _quantizer()
    blob = schema.encode_tensors(q.codebooks, q.mean, q.std, q.version)
    with pytest.raises(schema.ArtefactError, match=r"has shape \[2, 4, 3\] but meta.json says \[2, 4, 5\]"):
        schema.decode_tensors(blob, {**q.metadata, "dim": 5}, "cb")
    with pytest.raises(schema.ArtefactError, match="not a readable safetensors file"):
        schema.decode_tensors(b"not safetensors", q.metadata, "cb")


def test_missing_objects_on_storage_are_named(tmp_path):
    q = _quantizer()
    uri = str(tmp_path / "cb")
    assert save_quantizer(q, uri) == q.version
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == sorted(schema.FILES)
    assert load_quantizer(uri, device="cpu").version == q.version
    (tmp_path / "cb" / schema.TENSORS_NAME).unlink()
    with pytest.raises(schema.ArtefactError, match="incomplete MVQ artefact .*codebooks.safetensors is missing"):
        load_quantizer(uri)
    with pytest.raises(schema.ArtefactError, match="no MVQ codebook artefact .*meta.json is missing"):
        load_quantizer(str(tmp_path / "nothing"))
