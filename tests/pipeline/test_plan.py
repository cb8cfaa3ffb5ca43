"""`spear plan`: figures scale as the arithmetic says, follow the config or the named teachers, count the
real models' parameters and FLOPs, print both the FLOP bound and the measured / pessimistic figure with their
sources, never a zero that hides a small value, and docs/scaling.md shows what the command prints."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spear.config import ConfigError, load_config
from spear.pipeline.plan import (TEACHER_ARCHS, fmt_value, make_plan, parse_teacher, sig, student_params,
                                 teacher_gflop_parts, teacher_params, zipformer_rate_factor)

SPEAR = ["teachers.speech={kind: wavlm, path: /models/wavlm-large}",
         "teachers.audio={kind: dasheng, path: /models/dasheng-1.2b}", "train.student.size=spear-600m"]
REPO = Path(__file__).resolve().parents[2]


def _plan(overrides=(), **kw):
    kw = {"hours": 1000.0, "speech_share": 0.7, **kw}
    return make_plan(load_config(None, list(overrides)), **kw)


def _both(p, key):
    f = p.figures[key]
    return f.bound, f.rate


def test_device_hours_and_storage_scale_linearly_with_hours():
    a, b = _plan(SPEAR, hours=1000.0), _plan(SPEAR, hours=3000.0)
    for key in ("decode_cpu_hours", "speech_teacher_device_hours", "audio_teacher_device_hours",
                "tokenize_gpu_hours", "tokenize_cpu_hours", "tokenize_wall_hours", "storage_bytes"):
        assert b.figures[key].rate == pytest.approx(3 * a.figures[key].rate), key
        if a.figures[key].bound is not None:
            assert b.figures[key].bound == pytest.approx(3 * a.figures[key].bound), key
    assert a.figures["tokenize_gpu_hours"].bound > 0


def test_twice_the_gpus_halves_the_gpu_wall_time():
    one, two = _plan(SPEAR, gpus=4, cpus=100_000), _plan(SPEAR, gpus=8, cpus=100_000)  # GPU-bound
    for side in (0, 1):
        assert _both(one, "tokenize_gpu_hours")[side] == pytest.approx(_both(two, "tokenize_gpu_hours")[side])
        assert _both(two, "tokenize_wall_hours")[side] == pytest.approx(_both(one, "tokenize_wall_hours")[side] / 2)
    for role in ("speech", "audio"):
        d1, d2 = (p.to_dict()["figures"][f"{role}_teacher_device_hours"] for p in (one, two))
        for side in ("flop_bound", "rate"):
            assert d2[side]["wall_hours"] == pytest.approx(d1[side]["wall_hours"] / 2)


def test_token_storage_per_hour_matches_frame_rate_times_codebooks():
    p = _plan(SPEAR, hours=100.0, speech_share=0.7)
    assert p.figures["speech_tokens_bytes"].rate == pytest.approx(50 * 16 * 3600 * 100)
    assert p.figures["audio_tokens_bytes"].rate == pytest.approx(25 * 8 * 3600 * 30)   # audio-domain hours only
    assert p.figures["audio_bytes"].rate == pytest.approx(100 * 3600 * 20_000)
    assert _plan(SPEAR, hours=100.0, audio_in_shards=False).figures["audio_bytes"].rate == 0


def test_teachers_by_kind_and_size_without_checkpoints():
    spear = _plan(SPEAR)
    named = _plan(["train.student.size=spear-600m"], speech_teacher="wavlm-large", audio_teacher="dasheng-1.2b")
    assert named.teachers["speech"]["name"] == spear.teachers["speech"]["name"] == "wavlm-large@21"
    assert named.teachers["audio"]["name"] == spear.teachers["audio"]["name"] == "dasheng-1.2b"
    assert named.to_dict()["figures"] == spear.to_dict()["figures"]
    assert "checkpoint path" in spear.teachers["speech"]["size_source"]
    base = _plan(speech_teacher="wavlm-large", audio_teacher="dasheng-base")
    big = _plan(speech_teacher="wavlm-large", audio_teacher="dasheng-1.2b")
    for side in (0, 1):
        assert _both(base, "audio_teacher_device_hours")[side] < _both(big, "audio_teacher_device_hours")[side]
    assert base.teachers["audio"]["params"] < big.teachers["audio"]["params"]
    assert _plan(speech_teacher="hubert-xlarge@30").teachers["speech"]["layer"] == 30
    assert "audio" not in _plan(audio_teacher="none").teachers
    assert _plan(["teachers.audio=null"]).teachers.keys() == {"speech"}
    assert _plan(speech_teacher="student").teachers["speech"]["name"] == "student-tiny"
    assert parse_teacher("wavlm") == {"kind": "wavlm", "size": None, "layer": None}
    for bad in ("wavlm-huge", "whisper", "wavlm-large@x"):
        with pytest.raises(ConfigError, match="teacher"):
            parse_teacher(bad)
    with pytest.raises(ConfigError, match="out of range"):
        _plan(speech_teacher="wavlm-base@13")


def test_student_of_the_config_changes_the_figures():
    spear = _plan(SPEAR)
    large = _plan(SPEAR[:2] + ["train.student.size=spear-large"])
    assert large.student["params"] < spear.student["params"]
    assert large.figures["train_gpu_hours"].bound < spear.figures["train_gpu_hours"].bound
    # both wait on the input pipeline in the pessimistic figure (measured loader rate, one per training process)
    assert large.figures["train_gpu_hours"].rate == spear.figures["train_gpu_hours"].rate
    assert "input pipeline" in spear.figures["train_step_seconds"].rate_source
    more = _plan(SPEAR + ["train.max_steps=2000", "train.workers=[4, 4]"])
    assert more.figures["train_gpu_hours"].bound == pytest.approx(8 * spear.figures["train_gpu_hours"].bound)
    assert more.figures["train_audio_hours_seen"].rate == pytest.approx(8 * spear.figures["train_audio_hours_seen"].rate)


@pytest.mark.parametrize("name", ["wavlm-base", "wavlm-large", "hubert-large"])
def test_teacher_parameters_match_the_real_models(name):
    from transformers import HubertConfig, HubertModel, WavLMConfig, WavLMModel

    a = TEACHER_ARCHS[name]
    config_cls, model_cls = (WavLMConfig, WavLMModel) if a.family == "wavlm" else (HubertConfig, HubertModel)
    with torch.device("meta"):   # shapes only: no memory, no weights
        model = model_cls(config_cls(hidden_size=a.dim, num_hidden_layers=a.layers, intermediate_size=a.ffn,
                                     num_attention_heads=a.dim // 64))
    assert teacher_params(a) == pytest.approx(sum(p.numel() for p in model.parameters()), rel=2e-3)


@pytest.mark.parametrize("name", ["dasheng-base", "dasheng-0.6b", "dasheng-1.2b"])
def test_dasheng_parameters_match_this_codes_encoder(name):
    from spear.models.teachers import DashengConfig, DashengEncoder

    a = TEACHER_ARCHS[name]
    with torch.device("meta"):
        enc = DashengEncoder(DashengConfig(embed_dim=a.dim, depth=a.layers, num_heads=a.dim // 64))
    assert teacher_params(a) == pytest.approx(sum(p.numel() for p in enc.parameters()), rel=1e-4)


def test_teacher_flops_match_torchs_count_of_the_real_models():
    from transformers import WavLMConfig, WavLMModel

    from spear.models.teachers import DashengConfig, DashengEncoder

    with torch.device("meta"):
        wavlm = WavLMModel(WavLMConfig()).eval()      # WavLM Base shapes
        wav = torch.zeros(1, 16000 * 30)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        wavlm(wav)
    assert teacher_gflop_parts(TEACHER_ARCHS["wavlm-base"], 12, 30.0)["total"] == pytest.approx(
        counter.get_total_flops() / 30 / 1e9, rel=0.01)

    torch.manual_seed(0)
    dasheng = DashengEncoder(DashengConfig()).eval()  # base shapes on CPU (the mel front end needs real tensors)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        dasheng(torch.zeros(1, 160000), torch.tensor([160000]))
    parts = teacher_gflop_parts(TEACHER_ARCHS["dasheng-base"], 12, 10.0)
    # The counter does not see the masked attention kernel on CPU; the 250 tokens of 10 s run as one 252-token chunk.
    no_attention = parts["total"] - 12 * parts["attention_per_layer"]
    assert no_attention * 252 / 250 == pytest.approx(counter.get_total_flops() / 10 / 1e9, rel=0.01)


def test_student_parameters_are_counted_on_the_encoder():
    from spear.models.student.encoder import build_encoder

    assert student_params("zipformer2", "small") == sum(p.numel() for p in build_encoder("zipformer2", "small").parameters())


def test_zipformer_rate_factor_from_the_stack_layout():
    assert zipformer_rate_factor("spear-large") == pytest.approx(4.625 / 11)
    assert zipformer_rate_factor("spear-600m") == pytest.approx(5 / 13)


def test_small_values_keep_three_significant_figures():
    assert sig(0.000123456) == "0.000123" and sig(12.345) == "12.3" and sig(1234567) == "1,234,567"
    assert sig(0.1) == "0.1" and sig(0) == "0"
    assert fmt_value(2.5, "GPU h") == "2.5 GPU h"
    assert fmt_value(0.00125, "GPU h") == "4.5 GPU s"
    assert fmt_value(0.05, "h") == "3 min"
    assert fmt_value(2.4e-5, "s") == "24 us"
    assert fmt_value(7.2e12, "bytes") == "7.2 TB" and fmt_value(8.12e6, "bytes") == "8.12 MB"


def _numbers_shown(text):
    return [float(n.replace(",", "")) for n in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w.])", text)]


def test_every_time_figure_has_bound_and_rate_with_sources_in_words_and_no_hidden_zeros():
    for p in (_plan(hours=100.0, speech_share=1.0), _plan(SPEAR, gpus=16, cpus=896, gpu_type="l40s")):
        d = p.to_dict()
        for key, f in d["figures"].items():
            for side in ("flop_bound", "rate"):
                assert len(re.findall(r"[A-Za-z]{3,}", f[side]["source"])) >= 2, (key, side, f[side]["source"])
            if f["unit"] not in ("bytes", "epochs", "audio h"):
                assert f["rate"]["kind"] in ("measured", "pessimistic"), key
                if f["flop_bound"]["value"] is not None:
                    assert f["rate"]["value"] >= f["flop_bound"]["value"] * 0.999, key
        text = p.human()
        for key, f in p.figures.items():
            for value in (f.bound, f.rate):
                if value:   # a nonzero figure never prints as a zero
                    shown = fmt_value(value, f.unit)
                    assert shown in text and any(n > 0 for n in _numbers_shown(shown)), (key, shown)
        assert not re.search(r"(?<![\d.])0\.0+(?!\d)", text), "a zero that hides a small value"
        assert "(38.5 - 34.4)" not in text
    tiny = _plan(hours=100.0, speech_share=1.0)
    assert tiny.figures["train_step_seconds"].bound > 0
    assert any("kernel launches" in n for n in tiny.notes)


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


def test_cli_json_prints_one_object_with_both_figures_and_sources():
    r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "plan", "--hours", "100", "--speech-share", "0.7",
                        "--gpus", "2", "--json", "--speech-teacher", "wavlm-large", "--audio-teacher", "dasheng-base"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["hours"] == 100 and obj["cluster"]["gpus"] == 2
    f = obj["figures"]["speech_teacher_device_hours"]
    assert f["flop_bound"]["value"] > 0 and f["rate"]["value"] > f["flop_bound"]["value"]
    assert "layer shapes of WavLM Large" in f["flop_bound"]["source"] and "icefall" in f["rate"]["source"]
    assert f["rate"]["kind"] == "pessimistic" and f["rate"]["wall_hours"] == pytest.approx(f["rate"]["value"] / 2)
    bad = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "plan", "--hours", "1", "--speech-teacher",
                          "wavlm-huge"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "unknown teacher" in bad.stderr


def test_docs_scaling_shows_what_plan_prints():
    """The plan in docs/scaling.md is the command's output, verbatim."""
    doc = (REPO / "docs" / "scaling.md").read_text()
    block = re.search(r"```\n(\$ spear plan .*?)```", doc, re.S).group(1)
    lines = block.splitlines()
    n = next(i for i, line in enumerate(lines) if not line.rstrip().endswith("\\")) + 1
    argv = shlex.split(" ".join(line.rstrip().rstrip("\\") for line in lines[:n])[2:])
    r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *argv[1:]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n").splitlines() == lines[n:]


def test_a_released_spear_teacher_is_planned_at_the_preset_its_path_names():
    large = _plan(["teachers.speech={kind: spear, path: /models/spear-large-speech/, layer: 8}"])
    base = _plan(["teachers.speech={kind: spear, path: /models/spear-base-speech-audio.pt}"])
    assert large.teachers["speech"]["name"] == "spear-large" and base.teachers["speech"]["name"] == "spear-base"
    assert large.teachers["speech"]["params"] > 3 * base.teachers["speech"]["params"]
    assert large.teachers["speech"]["gflop_per_audio_second"] > 3 * base.teachers["speech"]["gflop_per_audio_second"]
    assert "spear-large" in large.teachers["speech"]["size_source"]
