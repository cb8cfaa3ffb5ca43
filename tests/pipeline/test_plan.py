"""`spear plan`: figures scale as the arithmetic says, follow the config, and print as one JSON object."""

import json
import subprocess
import sys

import pytest

from spear.pipeline.config import load_config
from spear.pipeline.plan import make_plan, zipformer_rate_factor

SPEAR = ["teachers.speech={kind: wavlm, path: /models/wavlm-large}",
         "teachers.audio={kind: dasheng, path: /models/dasheng-1.2b}", "train.student.size=spear-600m"]


def _plan(overrides=(), **kw):
    kw = {"hours": 1000.0, "speech_share": 0.7, **kw}
    return make_plan(load_config(None, list(overrides)), **kw)


def test_device_hours_and_storage_scale_linearly_with_hours():
    a, b = _plan(SPEAR, hours=1000.0), _plan(SPEAR, hours=3000.0)
    for key in ("gpu_hours", "cpu_hours", "decode_cpu_hours", "wall_hours"):
        assert b.tokenize[key] == pytest.approx(3 * a.tokenize[key])
    assert b.tokenize["storage"]["total_bytes"] == pytest.approx(3 * a.tokenize["storage"]["total_bytes"])
    assert a.tokenize["gpu_hours"] > 0


def test_twice_the_gpus_halves_the_gpu_wall_time():
    one, two = _plan(SPEAR, gpus=4, cpus=100_000), _plan(SPEAR, gpus=8, cpus=100_000)  # GPU-bound
    assert one.tokenize["gpu_hours"] == pytest.approx(two.tokenize["gpu_hours"])
    assert two.tokenize["wall_hours"] == pytest.approx(one.tokenize["wall_hours"] / 2)
    for role in ("speech", "audio"):
        assert two.tokenize["teachers"][role]["wall_hours"] == pytest.approx(one.tokenize["teachers"][role]["wall_hours"] / 2)


def test_token_storage_per_hour_matches_frame_rate_times_codebooks():
    p = _plan(SPEAR, hours=100.0, speech_share=0.7)
    tok = p.tokenize["storage"]["tokens"]
    assert tok["speech"]["bytes_per_audio_hour"] == 50 * 16 * 3600 == 2_880_000
    assert tok["audio"]["bytes_per_audio_hour"] == 25 * 8 * 3600 == 720_000
    assert tok["speech"]["bytes"] == pytest.approx(2_880_000 * 100)
    assert tok["audio"]["bytes"] == pytest.approx(720_000 * 30)      # audio teacher: audio-domain hours only
    assert p.tokenize["storage"]["audio_bytes"] == pytest.approx(100 * 3600 * 20_000)
    bare = _plan(SPEAR, hours=100.0, audio_in_shards=False)
    assert bare.tokenize["storage"]["audio_bytes"] == 0


def test_teachers_and_student_of_the_config_change_the_figures():
    default, spear = _plan(), _plan(SPEAR)
    assert default.tokenize["gpu_hours"] == 0 and default.tokenize["cpu_hours"] > default.tokenize["decode_cpu_hours"]
    assert spear.tokenize["teachers"]["speech"]["name"] == "wavlm-large@21"
    assert spear.tokenize["teachers"]["audio"]["name"] == "dasheng-1.2b"
    base = _plan(SPEAR[:1] + ["teachers.audio={kind: dasheng, path: /models/dasheng-base}"])
    assert base.tokenize["gpu_hours"] < spear.tokenize["gpu_hours"]
    no_audio = _plan(SPEAR[:1] + ["teachers.audio=null"])
    assert "audio" not in no_audio.tokenize["teachers"]
    large = _plan(SPEAR[:2] + ["train.student.size=spear-large"])
    assert large.train["gpu_hours"] < spear.train["gpu_hours"] and large.train["params"] < spear.train["params"]
    more = _plan(SPEAR + ["train.max_steps=2000", "train.workers=[4, 4]"])
    assert more.train["gpu_hours"] == pytest.approx(8 * spear.train["gpu_hours"])
    assert more.train["wall_hours"] == pytest.approx(2 * spear.train["wall_hours"])


def test_zipformer_rate_factor_from_the_stack_layout():
    assert zipformer_rate_factor("spear-large") == pytest.approx(4.625 / 11)
    assert zipformer_rate_factor("spear-600m") == pytest.approx(5 / 13)


def test_hours_listed_from_the_corpus_sources(tmp_path):
    (tmp_path / "sp").mkdir()
    (tmp_path / "au").mkdir()
    (tmp_path / "sp" / "a.flac").write_bytes(b"\0" * 72_000)      # 3.6 s at 20 kB/s
    (tmp_path / "au" / "b.wav").write_bytes(b"\0" * 32_000 * 9)   # 9 s at 32 kB/s
    cfg = load_config(None, [f"corpus.sources=[{{uri: {tmp_path / 'sp'}, domain: speech}}, "
                             f"{{uri: {tmp_path / 'au'}, domain: audio}}]"])
    p = make_plan(cfg)
    assert p.hours == pytest.approx(12.6 / 3600)
    assert p.speech_share == pytest.approx(3.6 / 12.6)


def test_cli_json_prints_one_object():
    r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "plan", "--hours", "100", "--speech-share", "0.7",
                        "--gpus", "2", "--json", *sum((["--set", s] for s in SPEAR), [])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["hours"] == 100 and obj["cluster"]["gpus"] == 2
    assert obj["tokenize"]["teachers"]["speech"]["device_hours"] > 0
    human = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "plan", "--hours", "100"],
                           capture_output=True, text=True, timeout=120)
    assert human.returncode == 0 and "TOKENISE" in human.stdout and "TRAIN" in human.stdout
