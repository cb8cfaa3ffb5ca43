"""`spear posttrain` on Ray Train: a killed run resumes exactly (against an uninterrupted run with its data and
output on SeaweedFS), an elastic run grows from 1 to 2 workers and shrinks back, and the export gives the
checkpoint's embeddings."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from spear.cluster.storage import Storage, join_uri
from spear.config import ConfigError, load_config
from spear.pipeline.posttrain_job import run_posttrain
from spear.pipeline.train_job import checkpoints, worker_group_starts

from support.configs import storage_sets

pytestmark = pytest.mark.slow

SENTENCES = ("the cat sat on the mat", "turn right at the green door", "three sheep and a dog")
VOICES = (("en", 160, 45), ("en-us+f2", 165, 70), ("en+m3", 145, 30), ("de+m2", 140, 40))
# tiny and fast: a 2-layer top of the tiny student, small heads, 4-row batches of at most 1.5 s
TINY = ["posttrain.batch_size=4", "posttrain.max_seconds=1.5", "posttrain.checkpoint_every=2",
        "posttrain.warmup_steps=2", "posttrain.trainable_layers=1", "posttrain.counting_clip_seconds=1.0",
        "posttrain.attributes=" + json.dumps([
            {"name": "speaker", "kind": "speaker", "dim": 16, "pool_hidden": 16, "margin_warmup_steps": 4},
            {"name": "semantic", "kind": "semantic", "dim": 32, "pool_hidden": 16},
            {"name": "counting", "kind": "counting", "dim": 8, "pool_hidden": 16, "tasks": ["tones", "higher"],
             "sample_weight": 0.5}])]


def _corpus(st: Storage, root: str) -> str:
    """4 espeak-ng voices x 3 sentences as WAV files and a CSV manifest with relative audio paths (ids given:
    the same corpus on local disk and on S3 has the same utterance ids)."""
    from spear.synthetic.speech import ESPEAK_RATE, synth_speech

    lines = ["id,audio,speaker,language,text,pivot"]
    for v, (voice, speed, pitch) in enumerate(VOICES):
        for s, text in enumerate(SENTENCES):
            buf = io.BytesIO()
            sf.write(buf, (synth_speech(text, voice, speed, pitch) * 0.8).astype(np.float32), ESPEAK_RATE,
                     format="WAV", subtype="PCM_16")
            st.write_bytes(join_uri(root, "audio", f"v{v}-s{s}.wav"), buf.getvalue())
            lines.append(f"v{v}-s{s},audio/v{v}-s{s}.wav,spk{v},{voice[:2]},{text},{text}")
    manifest = join_uri(root, "train.csv")
    st.write_text(manifest, "\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from spear.models.student import build_encoder
    from spear.stages.artefacts import export_student

    root = tmp_path_factory.mktemp("posttrain")
    torch.manual_seed(0)
    export_student(build_encoder("zipformer2", "tiny"), str(root / "student"))
    return root, _corpus(Storage(), str(root / "corpus")), str(root / "student")


def _cfg(model, manifest, out, steps, st=None, extra=()):
    sets = [f"posttrain.model={model}", f"posttrain.train_manifests={json.dumps([manifest])}", f"output={out}",
            f"posttrain.max_steps={steps}"] + TINY + list(extra)
    return load_config(None, sets + (storage_sets(st) if st is not None else []))


def _rows(st, out):
    _, uri = checkpoints(join_uri(out, "posttrain"), st)[-1]
    return list(csv.DictReader(io.StringIO(st.read_text(join_uri(uri, "metrics.csv")))))


@pytest.fixture(scope="module")
def killed_and_resumed(ray_cluster, s3_storage, inputs, tmp_path_factory):
    """An uninterrupted run with manifests, audio and output on SeaweedFS; the same corpus on local disk
    post-trained by `spear posttrain`, killed after a checkpoint, and resumed."""
    st = Storage()
    root, manifest, model = inputs
    clean = run_posttrain(_cfg(model, _corpus(s3_storage, "s3://spear/posttrain-corpus"), "s3://spear/posttrain-out",
                               8, s3_storage), progress=False)
    out = str(root / "killed")
    cmd = [sys.executable, "-m", "spear.pipeline.cli", "posttrain", "--model", model, "--train-manifest", manifest,
           "--output", out, "--max-steps", "8"] + [a for s in TINY for a in ("--set", s)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, RAY_ADDRESS=ray_cluster.address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(checkpoints(join_uri(out, "posttrain"), st)) < 2:
        time.sleep(0.1)
    finished = proc.poll() is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoints(join_uri(out, "posttrain"), st)[-1][0]
    cwd = os.getcwd()
    os.chdir(root)
    t_resume = time.time()
    try:  # relative spellings of the same model, manifest and output: it resumes the same run
        resumed = run_posttrain(_cfg("student", "corpus/train.csv", "killed", 8), progress=False)
    finally:
        os.chdir(cwd)
    starts = [e["resumed_from_step"] for e in worker_group_starts(join_uri(out, "posttrain"), st, since=t_resume)]
    return clean, resumed, out, killed_at, finished, starts


@pytest.mark.s3
def test_killed_posttrain_resumes_exactly(killed_and_resumed, s3_storage, tmp_path):
    from spear.stages.artefacts import load_posttrained

    st = Storage()
    clean, resumed, out, killed_at, finished, starts = killed_and_resumed
    assert not finished, "post-training finished before it could be killed"
    assert clean.step == 8 and clean.resumed_from_step is None and clean.world_sizes == [1]
    assert clean.checkpoint.startswith("s3://") and clean.model == "s3://spear/posttrain-out/posttrain/model"
    assert clean.data["rows"]["train"] == 12 and clean.attributes["speaker"]["rows"] == 12
    assert set(clean.attributes) == {"speaker", "semantic", "counting"}
    assert 2 <= killed_at < 8 and resumed.resumed_from_step == killed_at and resumed.step == 8
    # the workers started from that checkpoint too, not from Ray Train's run snapshot (which the killed
    # driver may not have updated: they went back to an older checkpoint or to step 0)
    assert starts == [killed_at]
    assert resumed.output == join_uri(out, "posttrain") and "speaker (speaker, dim 16): 12 training rows" in resumed.human()
    # the killed driver's checkpoints that Ray's snapshot never recorded are gone (they once stayed: 5 folders)
    from spear.pipeline.ray_train import RAY_CHECKPOINT_SNAPSHOT

    run = os.path.join(out, "posttrain", "train")
    with open(os.path.join(run, RAY_CHECKPOINT_SNAPSHOT)) as f:
        kept = {r["checkpoint_dir_name"] for r in json.load(f)["checkpoint_results"]}
    assert {n for n in os.listdir(run) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run, n))} == kept
    assert 1 <= len(kept) <= 3
    want, got = _rows(s3_storage, "s3://spear/posttrain-out"), _rows(st, out)
    # the same batches step for step, and the same losses to the bit: model, optimiser, data and the
    # trainable layers' dropout resumed exactly (the dropout stream once restarted from the seed)
    assert [r["batch_digest"] for r in got] == [r["batch_digest"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    a = load_posttrained(clean.model, storage=s3_storage, device="cpu", cache_dir=str(tmp_path / "cache"))
    b = load_posttrained(resumed.model, device="cpu")
    assert a.posttrain_info["metadata"]["speakers"] == ["spk0", "spk1", "spk2", "spk3"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.s3
def test_the_export_gives_the_checkpoints_embeddings(killed_and_resumed):
    from spear.stages.artefacts import load_posttrained
    from spear.stages.posttrain_loop import load_posttrain_checkpoint

    st = Storage()
    _, resumed, out, _, _, _ = killed_and_resumed
    ckpt_model, state = load_posttrain_checkpoint(resumed.checkpoint, st)
    exported = load_posttrained(resumed.model, device="cpu")
    assert state["step"] == 8 and exported.posttrain_info["metadata"]["step"] == 8
    wavs, lengths = torch.randn(2, 20000) * 0.1, torch.tensor([20000, 12000])
    with torch.no_grad():
        want, got = ckpt_model(wavs, lengths).embeddings, exported(wavs, lengths).embeddings
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert st.exists(join_uri(out, "posttrain", "metrics", "loss_curve.png"))
    # `spear export` of the post-training output (its latest checkpoint), run the way a user types it
    res = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "export", "killed", "--output", "exported", "--json"],
                         cwd=os.path.dirname(out), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["step"] == 8 and summary["attributes"] == {"speaker": "speaker", "semantic": "semantic",
                                                              "counting": "counting"}
    again = load_posttrained(os.path.join(os.path.dirname(out), "exported"), device="cpu")
    assert again.posttrain_info["metadata"]["speakers"] == ["spk0", "spk1", "spk2", "spk3"]
    with torch.no_grad():
        for name, v in again(wavs, lengths).embeddings.items():
            assert torch.allclose(v, want[name], atol=1e-6), name


def test_elastic_posttrain_grows_to_two_nodes_shrinks_back_and_finishes(inputs, tmp_path):
    root, manifest, model = inputs
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "support", "elastic_train.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    sets = [f"posttrain.model={model}", f"posttrain.train_manifests={json.dumps([manifest])}",
            "posttrain.max_steps=30"] + TINY
    r = subprocess.run([sys.executable, script, "--posttrain", str(tmp_path / "elastic"), json.dumps(sets)],
                       capture_output=True, text=True, timeout=900, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert lines, r.stderr[-4000:]
    report = json.loads(lines[-1])
    assert "error" not in report["result"], report
    summary = report["result"]["summary"]
    assert summary["step"] == 30
    # each resize restarted from the latest checkpoint with the data positions merged or split anew
    sizes = summary["world_sizes"]
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, (sizes, report["events"])


def test_a_training_output_is_post_trained_from_its_students_export(tmp_path):
    """posttrain.model may name a `spear train` output: its latest checkpoint's student is exported once
    (OUTPUT/posttrain/input-model) and the workers load that."""
    from spear.config import TrainConfig
    from spear.pipeline.posttrain_job import resolve_input_model
    from spear.stages.artefacts import load_any_student
    from spear.stages.train_data import TrainDataPlan
    from spear.stages.train_loop import MODEL_FILE, STATE_FILE, build_objective, heads_info

    cfg = TrainConfig.model_validate({"student": {"size": "tiny"}})
    plan = TrainDataPlan(files=(), live_keys=frozenset(), seconds_by_domain={}, roles=("speech",),
                         codebooks={"speech": 4}, frame_rates={"speech": 50.0})
    torch.manual_seed(3)
    objective = build_objective(cfg, plan)
    ckpt = tmp_path / "train-out" / "train" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    torch.save(objective.state_dict(), ckpt / MODEL_FILE)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 7, "heads": heads_info(plan), "train": cfg.model_dump(mode="json")}))
    st = Storage()
    uri = resolve_input_model(str(tmp_path / "train-out"), str(tmp_path / "out" / "posttrain"), st)
    assert uri == str(tmp_path / "out" / "posttrain" / "input-model")
    student = load_any_student(uri, device="cpu")
    assert student.config["metadata"]["step"] == 7
    for k, v in objective.encoder.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[k], v), k
    # an export or a release is used where it is
    assert resolve_input_model(uri, str(tmp_path / "other"), st) == uri


def test_one_line_errors_name_the_field(inputs, tmp_path):
    root, manifest, model = inputs
    with pytest.raises(ConfigError, match="posttrain.model"):
        run_posttrain(load_config(None, [f"output={tmp_path}"]), progress=False)
    with pytest.raises(ConfigError, match="posttrain.train_manifests"):
        run_posttrain(load_config(None, [f"output={tmp_path}", f"posttrain.model={model}"]), progress=False)
    with pytest.raises(ConfigError, match="posttrain.model .*does not exist"):
        run_posttrain(_cfg(str(tmp_path / "nothing"), manifest, str(tmp_path / "o"), 2), progress=False)


def test_semantic_targets_from_a_text_encoder_train_and_evaluate(inputs, tmp_path):
    """posttrain.attributes[].text_encoder: a transformers sentence encoder in a local folder gives the semantic
    targets (its width, not the attribute's dim, sizes the head); the export names it, and the attribute
    evaluation embeds the sentences with it for speech -> text retrieval."""
    from support.text_encoders import tiny_bert

    from spear.pipeline.posttrain_eval import AttributeEvalSettings, evaluate_posttrained, posttrained_config
    from spear.stages.artefacts import load_posttrained

    root, manifest, model = inputs
    words = sorted({w for s in SENTENCES for w in s.split()})
    encoder = tiny_bert(tmp_path / "bert", words, hidden=24)
    attrs = [{"name": "speaker", "kind": "speaker", "dim": 16, "pool_hidden": 16},
             {"name": "meaning", "kind": "semantic", "dim": 32, "pool_hidden": 16, "target_field": "text",
              "text_encoder": encoder}]
    cfg = _cfg(model, manifest, str(tmp_path / "out"), 2, extra=[f"posttrain.attributes={json.dumps(attrs)}"])
    summary = run_posttrain(cfg, progress=False)
    assert summary.step == 2 and summary.attributes["meaning"]["dim"] == 24
    st = Storage()
    data = join_uri(summary.output, "data")
    assert st.exists(join_uri(data, "targets-meaning.npy"))
    post = load_posttrained(summary.model, device="cpu")
    info = post.posttrain_info["metadata"]["attributes"]["meaning"]
    assert (info["targets"], info["text_encoder"], info["target_dim"]) == ("text_encoder", encoder, 24)
    res = evaluate_posttrained(summary.model, posttrained_config(summary.model, st),
                               AttributeEvalSettings(eval_manifests=(manifest,), n_bootstrap=50, counting_per_class=2),
                               input_model=None, corpus_root=None, storage=st, device=torch.device("cpu"),
                               probe_seeds=(0,))
    assert res["model"]["text_encoder"] == encoder
    assert "posttrained" in res["comparisons"]["retrieval/all/speech_to_text/R@1"]["values"]
