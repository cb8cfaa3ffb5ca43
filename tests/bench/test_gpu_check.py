"""bench/gpu_check.py: its cheapest sections run in a dry run (tiny sizes, CPU) and print every
figure beside its target; without a GPU, the GPU sections say so instead of measuring."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("spear_bench_gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _figures(node, path=""):
    """Every figure (a dict with a "value") under ``node``, with its path."""
    if isinstance(node, dict):
        if "value" in node:
            yield path, node
            return
        for k, v in node.items():
            yield from _figures(v, f"{path}.{k}" if path else k)


def test_figure_compares_value_and_target(gpu_check):
    assert gpu_check.figure(6000.0, 5000.0, "x")["met"] is True
    assert gpu_check.figure(4000.0, 5000.0, "x")["met"] is False
    assert gpu_check.figure(3.0, 2.0, "s", better="lower")["met"] is False
    assert gpu_check.figure(None, 5000.0, "x")["met"] is None
    assert gpu_check._steady(100.0, 10.0, 25.0, 5.0)[0] == pytest.approx(15.0)
    assert gpu_check._steady(100.0, 10.0, 25.0, 9.5)[0] is None  # fixed cost dominates: not a rate


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


def test_without_a_gpu_the_gpu_sections_say_so(gpu_check, tmp_path):
    result = gpu_check.run(gpu_check.parse_args(["--sections", "tokenize", "codebooks", "mvq_encode", "train",
                                                 "--work", str(tmp_path)]))
    if result["gpu_visible"]:
        pytest.skip("a GPU is visible: the sections would measure it")
    for name in ("tokenize", "codebooks", "mvq_encode", "train"):
        assert "no CUDA GPU" in result["sections"][name]["skipped"], name
    assert "no CUDA GPU visible" in result["note"]
