"""bench/gpu_check.py: its cheapest sections run in a dry run (tiny sizes, CPU) and print every
figure beside its target; without a GPU, the GPU sections say so instead of measuring."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def gpu_check(bench_module):
    return bench_module("gpu_check")


def _figures(node, path=""):
    """Every figure (a dict with a "value") under ``node``, with its path."""
    if isinstance(node, dict):
        if "value" in node:
            yield path, node
            return
        for k, v in node.items():
            yield from _figures(v, f"{path}.{k}" if path else k)


def test_figure_compares_value_and_target(gpu_check, bench_module):
    assert gpu_check.figure(6000.0, 5000.0, "x")["met"] is True
    assert gpu_check.figure(4000.0, 5000.0, "x")["met"] is False
    assert gpu_check.figure(3.0, 2.0, "s", better="lower")["met"] is False
    assert gpu_check.figure(None, 5000.0, "x")["met"] is None
    steady_state = bench_module("common").steady_state
    assert steady_state(100.0, 10.0, 25.0, 5.0)[:2] == pytest.approx((15.0, 10.0 - 100.0 / 15.0))
    assert steady_state(100.0, 10.0, 25.0, 9.5)[:2] == (None, None)  # fixed cost dominates: not a rate
    # a corpus too small for a shorter run (bench/decode.py --minutes 1): it was a ZeroDivisionError
    rate, fixed, why = steady_state(60.0, 3.0, 60.0, 3.1)
    assert rate is None and fixed is None and why.startswith("not measurable")


def test_dry_run_codebooks_and_mvq_encode(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    result = gpu_check.run(gpu_check.parse_args(["--dry-run", "--sections", "mvq_encode", "codebooks",
                                                 "--out", str(out), "--work", str(tmp_path / "work")]))
    assert json.loads(json.dumps(result, default=str)) == json.loads(out.read_text())
    assert result["dry_run"] is True and result["device"] == "cpu"
    sections = result["sections"]
    assert list(sections) == ["codebooks", "mvq_encode"]  # run in the pipeline's order
    for name, sec in sections.items():
        assert "error" not in sec, (name, sec.get("error"), sec.get("traceback"))
    figs = dict(_figures(sections))
    assert set(figs) >= {"codebooks.faiss_cpu_heldout_loss", "mvq_encode.frames_per_second"}
    for path, f in figs.items():
        assert set(f) >= {"value", "target", "unit", "met"}, path
    assert figs["mvq_encode.frames_per_second"]["target"] == 250_000
    assert figs["mvq_encode.frames_per_second"]["value"] > 0
    # codebooks fitted on teacher frames reconstruct held-out frames better than their mean
    loss = figs["codebooks.faiss_cpu_heldout_loss"]
    assert 0 < loss["value"] < loss["target"] == 1.0 and loss["met"] is True
    assert sections["codebooks"]["faiss_cpu_seconds"] > 0
    assert "no GPU" in sections["codebooks"]["faiss_gpu"]["skipped"]
    # the torch k-means (the default where faiss sees no GPU) is measured beside faiss-cpu, target its time
    torch_loss = figs["codebooks.torch_gpu_heldout_loss"]
    assert 0 < torch_loss["value"] < 1.0 and torch_loss["target"] == pytest.approx(loss["value"] * 1.02, rel=1e-3)
    assert figs["codebooks.torch_gpu_seconds"]["target"] == sections["codebooks"]["faiss_cpu_seconds"]
    assert sections["mvq_encode"]["codes_dtype"] == "torch.uint8"


def test_without_a_gpu_the_gpu_sections_say_so(gpu_check, tmp_path, monkeypatch):
    import torch

    # a machine without a GPU, wherever the test runs (on a GPU machine the sections would measure it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gpu_check.run(gpu_check.parse_args(["--sections", "tokenize", "codebooks", "mvq_encode", "train",
                                                 "--work", str(tmp_path)]))
    assert result["gpu_visible"] is False
    for name in ("tokenize", "codebooks", "mvq_encode", "train"):
        assert "no CUDA GPU" in result["sections"][name]["skipped"], name
    assert "no CUDA GPU visible" in result["note"]
