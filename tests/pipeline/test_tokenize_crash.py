"""Crash safety of `spear tokenize`: whatever dies mid-run, a re-run commits exactly what a clean run does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

import pytest

from spear.cluster.storage import Storage, join_uri
from spear.pipeline.ledger import TokenStore, list_token_versions
from spear.pipeline.tokenize_job import run_tokenize

from support.configs import tokenize_cfg
from support.corpus import write_mixed_corpus

pytestmark = [pytest.mark.slow]

CRASH = ["mvq.speech_codebooks=4", "mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.sample_frames=1000",
         "decode.max_segment_seconds=1", "tokenize.shard_target_mb=0.1", "tokenize.commit_interval_s=0.3",
         "decode.objects_per_task=1",
         # small teacher batches, so pass 2 streams out in many pieces and a kill lands mid-run
         "teachers.speech.batch_seconds=2", "teachers.audio.batch_seconds=2"]


def _cfg(st, corpus, out):
    return tokenize_cfg(st, corpus, out, CRASH)


def _committed(st, out):
    """segment id -> (source, token bytes per role) of the live rows of the only token version."""
    (version,) = list_token_versions(out, st)
    t = TokenStore(out, version, st).read_table(["segment_id", "source_uri", "speech_tokens", "audio_tokens"])
    return {r["segment_id"]: (r["source_uri"], r["speech_tokens"], r["audio_tokens"]) for r in t.to_pylist()}


def _copy_codebooks(src_st, src_out, dst_st, dst_out):
    """The runs under comparison share codebooks, so their tokens are comparable byte for byte."""
    fs, src = src_st.filesystem(join_uri(src_out, "codebooks"))
    for path in fs.find(src):
        dst_st.write_bytes(join_uri(dst_out, "codebooks", path[len(src.rstrip("/")) + 1:]), fs.cat_file(path))


def _tokenize_in_background(cfg) -> tuple[threading.Thread, dict]:
    """Start run_tokenize in a thread; its summary or its error lands in the returned dict
    (failing is allowed mid-crash: the re-run must repair it)."""
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = run_tokenize(cfg, progress=False)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to inspect
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _first_manifest(st, out, timeout=120.0, proc=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        for v in list_token_versions(out, st):
            if TokenStore(out, v, st).latest_manifest() is not None:
                return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory, ray_cluster):
    st = Storage()
    root = str(tmp_path_factory.mktemp("crash"))
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=14, n_audio=8, seed=11, seconds=(3.0, 5.0))
    clean_out = join_uri(root, "clean")
    run_tokenize(_cfg(st, join_uri(root, "corpus"), clean_out), progress=False)
    return st, root, clean_out, _committed(st, clean_out)


def test_driver_killed_mid_run_then_rerun_equals_clean_run(crash_corpus, ray_cluster):
    st, root, clean_out, clean = crash_corpus
    out = join_uri(root, "driver-kill")
    _copy_codebooks(st, clean_out, st, out)
    cfg = _cfg(st, join_uri(root, "corpus"), out)
    sets = [a for s in CRASH for a in ("--set", s)]
    cmd = [sys.executable, "-m", "spear.pipeline.cli", "tokenize", "--output", out, *sets,
           "--set", "corpus.sources=" + json.dumps([s.model_dump(mode="json") for s in cfg.corpus.sources])]
    proc = subprocess.Popen(cmd, env=dict(os.environ, RAY_ADDRESS=ray_cluster.address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _first_manifest(st, out, proc=proc), "the run ended before its first commit: enlarge the corpus"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = _committed(st, out)
    assert len(partial) < len(clean)  # it really died mid-run
    assert all(partial[k] == clean[k] for k in partial)  # what was committed is already right

    summary = run_tokenize(cfg, progress=False)
    assert summary.skipped_objects > 0
    assert _committed(st, out) == clean


def _shard_files(out: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
            if f.startswith("shard-") and f.endswith(".parquet") and f"{os.sep}shards{os.sep}" in d]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_commits_what_it_finished_and_the_rerun_does_the_rest(crash_corpus, ray_cluster, sig):
    """`spear stop` (SIGTERM to the driver) or Ctrl-C mid-run: no interval commit falls in this run, yet the
    objects it finished are committed on its way out; before, they were lost and tokenised again."""
    st, root, clean_out, clean = crash_corpus
    out = join_uri(root, f"stopped-{sig.name}")
    _copy_codebooks(st, clean_out, st, out)
    cfg = _cfg(st, join_uri(root, "corpus"), out)
    sets = [a for s in CRASH + ["tokenize.commit_interval_s=1e6"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "spear.pipeline.cli", "tokenize", "--output", out, *sets,
           "--set", "corpus.sources=" + json.dumps([s.model_dump(mode="json") for s in cfg.corpus.sources])]
    proc = subprocess.Popen(cmd, env=dict(os.environ, RAY_ADDRESS=ray_cluster.address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_shard_files(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it was stopped: enlarge the corpus"
        assert len(_shard_files(out)) >= 4, "pass 2 wrote too few shard files in 120 s"
        time.sleep(1.0)  # the driver has the writers' reports of those files
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, err[-3000:]
    assert re.search(r"\[tokenize\] the run (terminated|interrupted): committed the \d+ object\(s\) it had finished",
                     err), err[-3000:]
    partial = _committed(st, out)
    assert 0 < len(partial) < len(clean), err[-3000:]
    assert all(partial[k] == clean[k] for k in partial)  # what was committed is already right
    summary = run_tokenize(cfg, progress=False)
    assert summary.skipped_objects > 0 and summary.new_objects < 22
    assert _committed(st, out) == clean


def test_teacher_actor_killed_mid_run_is_replaced_and_the_run_commits_what_a_clean_run_does(crash_corpus, ray_cluster):
    from ray.util.state import list_actors

    st, root, clean_out, clean = crash_corpus
    out = join_uri(root, "actor-kill")
    _copy_codebooks(st, clean_out, st, out)
    cfg = _cfg(st, join_uri(root, "corpus"), out)
    before = {a.actor_id for a in list_actors(detail=False, limit=10_000)}  # an earlier test's may linger
    thread, outcome = _tokenize_in_background(cfg)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
            # the only actor pools of a tokenize run are the teacher stages (decode and writing are tasks)
            if "MapWorker" in (a.class_name or "") and a.pid and a.actor_id not in before:
                os.kill(a.pid, signal.SIGKILL)
                killed = a
                break
        time.sleep(0.1)
    assert killed is not None, "no teacher actor of the run was seen alive to kill"
    thread.join(timeout=240)
    if thread.is_alive():  # Ray Data waited for an actor that died idle (ray-project/ray#62746)
        stack = "".join(traceback.format_stack(sys._current_frames()[thread.ident]))
        pytest.fail(f"the run did not end within 240 s of its teacher actor's death ({killed.class_name}); "
                    f"it waits in:\n{stack}")
    # one death is replaced (TEACHER_ACTOR_RESTARTS) and the run goes on to commit everything
    assert "error" not in outcome, f"one teacher actor's death ended the run: {outcome['error']}"
    assert outcome["summary"].committed_objects == 22 and _committed(st, out) == clean
    summary = run_tokenize(cfg, progress=False)
    assert summary.committed_objects == 22 and summary.new_objects == 0
    assert _committed(st, out) == clean


@pytest.mark.s3
def test_storage_server_restarted_mid_run_then_rerun_equals_clean_run(crash_corpus, ray_cluster, s3_server):
    st_local, root, clean_out, clean_local = crash_corpus
    st = Storage(s3_server.storage_options())
    s3_root = "s3://spear/crash-restart"
    corpus = join_uri(root, "corpus")
    fs, path = st_local.filesystem(corpus)
    for p in fs.find(path):  # the same corpus bytes on S3
        st.write_bytes(join_uri(s3_root, "corpus", p[len(path) + 1:]), fs.cat_file(p))
    out = join_uri(s3_root, "out")
    _copy_codebooks(st_local, clean_out, st, out)
    cfg = _cfg(st, join_uri(s3_root, "corpus"), out)
    thread, outcome = _tokenize_in_background(cfg)
    try:
        assert _first_manifest(st, out), "no commit before the outage"
        s3_server.stop()
        time.sleep(3)
    finally:
        s3_server.start()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert ("error" in outcome) != ("summary" in outcome), outcome
    if "error" in outcome:  # the run gave up during the outage: its one error names the storage problem
        assert "storage" in str(outcome["error"]).lower() or "connect" in str(outcome["error"]).lower()
    else:  # its retries rode out the outage: then it committed every object
        assert outcome["summary"].committed_objects == 22, outcome["summary"].human()
    run_tokenize(cfg, progress=False)
    # same segments and tokens as the clean local run, keyed by the path relative to the corpus
    rel = lambda uri: uri.split("/corpus/", 1)[1]  # noqa: E731
    got = {k: (rel(v[0]), v[1], v[2]) for k, v in _committed(st, out).items()}
    want = {k: (rel(v[0]), v[1], v[2]) for k, v in clean_local.items()}
    assert got == want

