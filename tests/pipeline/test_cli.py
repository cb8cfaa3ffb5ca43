"""The `spear` CLI as a user runs it: a subprocess, its stdout, its exit code."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from support.audio_files import encode, make_signal


def spear(*args, env=None, timeout=300, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def test_help_lists_the_command_tree():
    r = spear("--help")
    assert r.returncode == 0
    for cmd in ("demo", "decode", "tokenize", "train", "evaluate", "export", "submit", "status", "config",
                "convert-checkpoint"):
        assert cmd in r.stdout
    r = spear("decode", "--help")
    assert "--input" in r.stdout and "--json" in r.stdout and "--set" in r.stdout


def test_config_init_is_a_valid_config_and_show_masks_secrets(tmp_path):
    r = spear("config", "init")
    assert r.returncode == 0
    p = tmp_path / "spear.yaml"
    p.write_text(r.stdout)
    r = spear("config", "show", str(p), "--set", "storage.secret_access_key=hunter2", "--set", "decode.max_segment_seconds=7")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["decode"]["max_segment_seconds"] == 7.0
    assert shown["storage"]["secret_access_key"] == "***" and "hunter2" not in r.stdout


def test_invalid_config_gets_one_clear_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("decode:\n  max_segment_seconds: lots\n")
    r = spear("decode", str(p), "--input", str(tmp_path), "--domain", "speech")
    assert r.returncode == 2
    assert str(p) in r.stderr and "decode.max_segment_seconds" in r.stderr and "valid number" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_storage_fails_fast_without_traceback(tmp_path):
    from support.configs import closed_port

    with closed_port() as port:
        env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        r = spear("decode", "--input", "s3://bucket/x", "--domain", "speech", "--output", str(tmp_path / "o"),
                  "--set", "storage.retries=1", "--set", "storage.connect_timeout_s=1", env=env)
    assert r.returncode == 1
    assert "cannot reach storage" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_decode_json_prints_only_the_summary_object(ray_cluster, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.flac").write_bytes(encode(make_signal(44100, 2, 3.0), 44100, "flac"))
    (src / "b.wav").write_bytes(b"")
    r = spear("decode", "--input", str(src), "--domain", "speech", "--output", str(tmp_path / "out"), "--json",
              env={"RAY_ADDRESS": ray_cluster.address})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert summary["objects"] == 2 and summary["segments"] == 1
    assert summary["audio_seconds"] == pytest.approx(3.0, abs=1e-3)
    assert summary["quarantined"] == [{"uri": str(src / "b.wav"), "reason": "empty object (0 bytes)", "stage": "decode",
                                     "kept_seconds": None}]
    assert summary["output"] == str(tmp_path / "out")
    assert "[decode]" in r.stderr  # progress went to stderr


@pytest.mark.slow
def test_input_domain_pairs_repeat_and_a_mismatch_is_one_error_line(ray_cluster, tmp_path):
    """`--input speech/ --domain speech --input audio/ --domain audio` decodes both folders, each with its
    domain (click kept only the last pair before, silently dropping the speech folder); a count of --domain
    that fits neither one-for-all nor one-per-input is a one-line error before anything runs."""
    import pyarrow.parquet as pq

    for name, rate in (("speech", 16000), ("audio", 44100)):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.flac").write_bytes(encode(make_signal(rate, 1, 2.0), rate, "flac"))
    out = tmp_path / "out"
    r = spear("decode", "--input", "speech", "--domain", "speech", "--input", "audio", "--domain", "audio",
              "--output", str(out), "--json", env={"RAY_ADDRESS": ray_cluster.address}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["segments"] == 2
    rows = pq.read_table([str(f) for f in sorted((out / "segments").glob("part-*.parquet"))],
                         columns=["source", "domain"]).to_pylist()
    # each segment's source is the folder it was listed from, with that folder's domain
    assert sorted((os.path.basename(x["source"].rstrip("/")), x["domain"]) for x in rows) == [("audio", "audio"),
                                                                                              ("speech", "speech")]
    bad = spear("decode", "--input", "speech", "--input", "audio", "--domain", "speech", "--domain", "audio",
                "--domain", "speech", "--output", str(tmp_path / "o2"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: 2 --input but 3 --domain")
    assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- the CLI's parts


def test_reserved_stdout_holds_only_what_is_written_to_it(capfd):
    from spear.pipeline.stdout import reserve_stdout

    with reserve_stdout(True) as out:
        print("a print")
        os.write(1, b"a write to fd 1\n")  # what Ray workers and C libraries do
        out.write('{"summary": 1}\n')
    print("after")
    captured = capfd.readouterr()
    assert captured.out == '{"summary": 1}\nafter\n'
    assert "a print" in captured.err and "a write to fd 1" in captured.err
    with reserve_stdout(False) as out:
        assert out is sys.stdout


def test_errors_exit_2_for_a_bad_request_and_1_for_a_failed_run():
    from spear.cluster.jobs import JobError
    from spear.pipeline.cli_errors import SpearCLIError, failure_error, job_request_errors
    from spear.pipeline.run_log import Failure

    assert SpearCLIError("bad flag").exit_code == 2
    config = Failure(line="invalid config", kind="config", root=ValueError(), log_path=None)
    crash = Failure(line="boom (full log: x.log)", kind="unexpected", root=ValueError(), log_path=None)
    assert (failure_error(config).exit_code, failure_error(crash).exit_code) == (2, 1)
    assert failure_error(crash).message == "boom (full log: x.log)"
    with pytest.raises(SpearCLIError, match="no job raysubmit_x") as err:
        with job_request_errors():
            raise JobError("no job raysubmit_x on http://h:8265")
    assert err.value.exit_code == 2


def test_a_submitted_job_says_how_to_follow_it_until_it_ends():
    from spear.cluster.jobs import JobState
    from spear.pipeline.submission import SubmittedJob

    running = SubmittedJob(JobState(job_id="raysubmit_1", status="RUNNING", address="http://h:8265"))
    assert running.human().startswith(running.state.human() + "\n")
    assert "spear logs --address http://h:8265 --follow raysubmit_1" in running.human()
    done = SubmittedJob(JobState(job_id="raysubmit_1", status="SUCCEEDED", address="http://h:8265"))
    assert done.human() == done.state.human() and done.succeeded
    assert done.to_dict() == done.state.to_dict()  # --json prints the job's state as before


@pytest.mark.slow
def test_tokenize_on_a_small_node_with_a_gpu_takes_the_gpu_paths_and_training_needs_a_cuda_torch(tmp_path):
    """The GPU branch of tokenize, on an embedded Ray that declares one GPU (this machine has none, so torch
    computes on the CPU): teacher pools of half a GPU each, the codebook fit as a GPU task whose progress
    lines reach the console. On 2 CPUs the two GPU actors once held a whole CPU each and pass 2 waited
    forever for a decode task; now each holds a quarter of its pool's CPUs and the run ends."""
    from spear.cluster.storage import Storage
    from support.configs import SMALL
    from support.corpus import write_mixed_corpus

    write_mixed_corpus(Storage(), str(tmp_path / "corpus"), n_speech=3, n_audio=2, seed=5, seconds=(1.5, 2.5))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "tokenize", "--input", "corpus/speech", "--domain",
                        "speech", "--input", "corpus/audio", "--domain", "audio", "--output", "tokens", "--json",
                        *[a for s in SMALL + ["ray.num_gpus=1", "ray.num_cpus=2"] for a in ("--set", s)]],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    assert summary["new_objects"] == 5 and summary["committed_objects"] == 5 and not summary["quarantined"]
    for role in ("speech", "audio"):
        assert f"[tokenize] {role} teacher" in r.stderr and "0.5 GPU, 0.25 CPU" in r.stderr, r.stderr[-3000:]
        # the GPU task's own lines, forwarded by Ray with the task's name
        assert re.search(rf"\(fit_quantizer_task pid=\d+\).*\[tokenize\] {role} codebooks: k-means init codebook 1/",
                         r.stderr), r.stderr[-3000:]
    # training there: the workers would take a GPU each, which this CPU build of torch cannot use; one line says
    # so (it was an NCCL traceback from the first worker: "Distributed package doesn't have NCCL built in")
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "train", "--shards", "tokens", "--output",
                            "student", "--max-steps", "1", "--set", "ray.num_gpus=1", "--set", "ray.num_cpus=2"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: Ray sees 1 GPU(s) on this machine but torch {torch.__version__} cannot use CUDA: install a CUDA "
            "build of torch, or set ray.num_gpus=0 to train on the CPUs"), r.stderr[-3000:]
        assert "Traceback" not in r.stderr and not (tmp_path / "student").exists()
