"""Embedded Ray start-up as a user sees it: said at once, timed, the same figure in --json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

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


def test_a_session_inside_this_process_embedded_ray_is_embedded_too(ray_cluster):
    """`spear demo` and `spear run` open one embedded Ray and run each job's own session inside it: those
    jobs run on this one machine (a teacher actor that dies ends the run instead of restarting without
    end), and the inner session leaves the outer one's Ray running."""
    import ray

    from spear.cluster.ray_runtime import ray_session

    assert ray_cluster.embedded
    with ray_session(announce=None) as inner:
        assert inner.embedded and inner.address == ray_cluster.address and inner.start_seconds == 0.0
    assert ray.is_initialized()


@pytest.mark.slow
def test_a_session_inside_a_ray_this_module_did_not_start_is_not_embedded():
    """A driver whose Ray someone else started (`ray job submit`, a notebook's own ray.init) is not told
    it is embedded: the job keeps Ray Data's actor restarts, as on a cluster."""
    temp = tempfile.mkdtemp(prefix="spear-t-")  # short: Ray's socket paths must fit in 107 bytes
    code = ("import ray\nfrom spear.cluster.ray_runtime import ray_session\n"
            f"ray.init(num_cpus=1, include_dashboard=False, _temp_dir={temp!r})\n"
            "with ray_session(announce=None) as info:\n    print('embedded', info.embedded)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded False" in r.stdout.splitlines()


def test_ray_data_runs_without_its_progress_bars_and_without_the_notice_that_they_are_off():
    """spear's jobs print their own progress; Ray Data's once-per-process warning that its bars are off told
    users to change a setting they cannot reach, in every decode and tokenize log."""
    import logging

    import ray.data

    from spear.cluster.ray_runtime import ray_data_without_progress_bars

    ray_data_without_progress_bars()
    ray_data_without_progress_bars()  # idempotent: one filter
    assert ray.data.DataContext.get_current().enable_progress_bars is False
    logger = logging.getLogger("ray.data._internal.progress")
    assert len(logger.filters) == 1

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    assert not logger.filter(record("Progress bars disabled. To enable, set `ray.data...`."))
    assert logger.filter(record("Progress bars for operators disabled."))
