"""safetensors bytes that depend only on the tensors and the metadata (safetensors alone orders its
metadata map differently from save to save)."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load

from spear.schemas import student_export
from spear.schemas.tensor_file import save_tensors


def test_the_same_tensors_and_metadata_give_the_same_bytes_and_read_back_unchanged(tmp_path):
    tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(5),
               "größe": torch.zeros(2, dtype=torch.int64)}  # a non-ASCII name keeps the header's length too
    meta = {"format": "spear-student", "format_version": "1", "kind": "test", "note": "é"}
    saves = {save_tensors(tensors, meta) for _ in range(20)}
    assert len(saves) == 1
    blob = saves.pop()
    back = load(blob)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    (tmp_path / "t.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == meta


def test_two_exports_of_the_same_weights_have_the_same_sha256():
    state = {f"layer{i}.weight": torch.randn(4, 4) for i in range(8)}
    fields = {"encoder": {"architecture": "zipformer2"}, "frame_rate": 50.0}
    hashes = {student_export.encode_export(state, fields)[1]["weights_sha256"] for _ in range(10)}
    assert len(hashes) == 1
