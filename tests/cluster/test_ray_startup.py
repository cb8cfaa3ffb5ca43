"""Embedded Ray start-up as a user sees it: said at once, timed, the same figure in --json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from support.audio_files import encode, make_signal


@pytest.mark.slow
def test_embedded_start_is_announced_and_its_time_is_the_summary_figure(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.wav").write_bytes(encode(make_signal(16000, 1, 1.0), 16000, "wav"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh embedded Ray, as a user gets
    r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "decode", "--input", str(src), "--domain", "speech",
                        "--output", str(tmp_path / "out"), "--json", "--set", "ray.num_cpus=1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    start = lines.index("starting Ray (embedded, 1 CPUs) ...")
    ready = next(i for i, line in enumerate(lines) if line.startswith("Ray ready in "))
    assert start < ready
    said = float(re.match(r"Ray ready in (\d+\.\d) s$", lines[ready]).group(1))
    summary = json.loads(r.stdout)
    assert said == round(summary["ray_start_seconds"], 1) and summary["segments"] == 1
    assert "constructor arguments in the object store" not in r.stderr
