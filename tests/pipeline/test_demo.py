"""`spear demo` holds the probes' test clips out of pre-training: the sources it tokenises, and
so the token dataset, the codebooks and the student, never hold a probe test clip."""

from __future__ import annotations

import os

import pytest

from spear.cluster.storage import Storage
from spear.config import load_config
from spear.evaluation.tasks import TaskSources, probe_test_uris
from spear.pipeline.demo import pretraining_sources
from spear.pipeline.ledger import TokenStore
from spear.pipeline.run_job import probe_test_files_in_sources


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from spear.synthetic.corpus import generate_demo_corpus

    return generate_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", size="tiny", seed=0)


def _split_files(corpus) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "test": set()}
    for r in corpus.labels():
        out[r["split"]].add(os.path.realpath(corpus.root / r["path"]))
    return out


def test_pretraining_sources_are_the_clips_outside_every_probe_test_split(tiny_corpus, tmp_path):
    split = _split_files(tiny_corpus)
    assert split["test"] and split["train"]
    held = {os.path.realpath(u) for u in probe_test_uris(TaskSources(corpus_root=str(tiny_corpus.root)), Storage())}
    assert held == split["test"]  # the probes' test items are exactly the corpus' test clips

    view = tmp_path / "pretrain"
    sources, counts = pretraining_sources(tiny_corpus, str(view))
    assert [(s.domain, s.source_name) for s in sources] == [("speech", "demo-speech"), ("audio", "demo-audio")]
    listed = {os.path.realpath(os.path.join(d, n)) for s in sources for d, _, ns in os.walk(s.uri) for n in ns}
    assert listed == split["train"] and not listed & held
    assert counts == {"pretrain_files": len(split["train"]), "held_out_test_files": len(split["test"])}

    # a stale link (say, a clip that moved to the test split) goes on the next build
    stale = view / "speech" / "stale.wav"
    os.symlink(next(iter(split["test"])), stale)
    cfg = load_config(None, [])
    cfg.corpus.sources = sources
    assert probe_test_files_in_sources(held, cfg) == 1
    pretraining_sources(tiny_corpus, str(view))
    assert not os.path.lexists(stale) and probe_test_files_in_sources(held, cfg) == 0
    # the corpus folders themselves hold every test clip: what `spear run` reports as transductive
    cfg.corpus.sources[0].uri, cfg.corpus.sources[1].uri = str(tiny_corpus.speech_dir), str(tiny_corpus.audio_dir)
    assert probe_test_files_in_sources(held, cfg) == len(split["test"])
    # object-store sources: a test URI under a source's prefix counts (no listing needed)
    cfg.corpus.sources[0].uri = "s3://b/corpus/speech"
    assert probe_test_files_in_sources({"s3://b/corpus/speech/a.wav", "s3://b/corpus/speech2/a.wav"}, cfg) == 1


@pytest.mark.slow
def test_the_demo_token_dataset_holds_no_probe_test_clip(ray_cluster, tiny_corpus, tmp_path):
    from spear.pipeline.tokenize_job import run_tokenize

    split = _split_files(tiny_corpus)
    sources, _ = pretraining_sources(tiny_corpus, str(tmp_path / "pretrain"))
    cfg = load_config(None, [f"output={tmp_path / 'tokens'}", "mvq.speech_codebooks=4", "mvq.audio_codebooks=2",
                             "mvq.codebook_size=16", "mvq.sample_frames=2000", "decode.max_segment_seconds=10"])
    cfg.corpus.sources = sources
    summary = run_tokenize(cfg, progress=False)
    rows = TokenStore(cfg.output, summary.token_version, Storage()).read_table(["source_uri"]).to_pylist()
    tokenised = {os.path.realpath(r["source_uri"]) for r in rows}
    assert tokenised and not tokenised & split["test"]
    assert tokenised == split["train"] - {os.path.realpath(q["uri"]) for q in summary.quarantined}


@pytest.mark.slow
def test_demo_with_pretrained_teachers_and_ablation_end_to_end(ray_cluster, tmp_path):
    """`spear demo --ablation` on the tiny corpus (few steps): the pretrained teachers tokenise, the
    dual-teacher and both single-teacher students train on the same shards, the ablation is probed and
    saved, the report shows it and the distillation check; a later demo without --ablation shows the
    saved figures as such."""
    import json

    from spear.pipeline.demo import ABLATION_DIR, ABLATION_FILE, demo_config, format_ablation, run_demo

    cfg = demo_config(None, size="tiny")  # `spear demo --size tiny`'s scale: 2 x 16 codebooks, 3 steps
    assert (cfg.teachers.speech.kind, cfg.teachers.audio.kind) == ("resemblyzer", "crepe")
    work = tmp_path / "spear-demo"
    summary = run_demo(cfg, workdir=str(work), size="tiny", ablation=True, progress=False).to_dict()
    saved = json.loads((work / ABLATION_DIR / ABLATION_FILE).read_text())
    assert saved["teachers"] == {"speech": "resemblyzer", "audio": "crepe"}
    assert saved["command"] == "spear demo --ablation --size tiny" and saved["train_steps"] == 3
    assert saved["corpus_size"] == "tiny"
    assert set(saved["means"]["all"]) == {"dual", "speech-only", "audio-only", "random_student", "fbank"}
    assert saved["best"]["all"] in ("dual", "speech-only", "audio-only")
    # the single-teacher students learned from one teacher each: their checkpoints' heads say so
    from spear.pipeline.train_job import checkpoints, load_checkpoint_objective

    for label, role in (("speech-only", "speech"), ("audio-only", "audio"), ("dual", None)):
        out = str(work / "iter1" / "student") if role is None else str(work / ABLATION_DIR / label / "student")
        objective, _ = load_checkpoint_objective(checkpoints(out, Storage())[-1][1], Storage())
        assert set(objective.heads) == ({"speech", "audio"} if role is None else {role}), label
    assert summary["ablation"]["from_this_run"] is True and summary["distillation_checks"]
    page = (work / "iter1" / "evaluation" / "index.html").read_text()
    assert "One teacher or two" in page and "measured in this evaluation" in page
    assert (work / "iter1" / "evaluation" / "ablation.png").is_file()
    assert "One teacher or two" in (work / ABLATION_DIR / "evaluation" / "index.html").read_text()

    # a later demo shows the saved ablation; with --posttrain it post-trains the student with and without
    # the counting tasks on the multilingual corpus and compares both with the input student and fbank
    assert (cfg.posttrain.max_steps, cfg.posttrain.batch_size) == (4, 8)
    result = run_demo(cfg, workdir=str(work), size="tiny", posttrain=True, progress=False)
    again = result.to_dict()
    # the student, corpus, teachers and seeds are unchanged: the evaluation of the first run is reused, not re-probed
    assert again["evaluate"]["wall_seconds"] == summary["evaluate"]["wall_seconds"]
    assert again["evaluate"]["provenance"]["student"]["metadata"]["step"] == summary["export"]["step"] == 3
    assert again["ablation"]["from_this_run"] is False and again["ablation"]["measured"] == saved["measured"]
    assert "the last saved figures, measured" in (work / "iter1" / "evaluation" / "index.html").read_text()
    assert "each student trained 3 steps" in (work / "iter1" / "evaluation" / "index.html").read_text()
    assert ", 3 training steps)" in format_ablation(again["ablation"])
    post = again["posttrain"]
    assert {label: run["step"] for label, run in post["runs"].items()} == {"with-counting": 4, "without-counting": 4}
    assert set(post["runs"]["with-counting"]["attributes"]) == {"speaker", "semantic", "counting"}
    assert set(post["runs"]["without-counting"]["attributes"]) == {"speaker", "semantic"}
    assert [c["metric"] for c in post["checks"]] == ["verification/eer", "retrieval/all/speech_to_speech/R@1",
                                                     "counting/synthetic/probe"]
    assert all(c["model_value"] is not None and set(c["baselines"]) == {"input", "fbank"} for c in post["checks"])
    measures = {r["measure"] for r in post["with_without"]}
    assert {"verification/eer", "counting/synthetic/probe", "probe/speaker", "probe/pitch"} <= measures
    assert "posttrain_demo.json" in os.listdir(work / "posttrain")
    page = (work / "posttrain" / "evaluation" / "index.html").read_text()
    assert "Utterance-level attributes" in page and "without-counting" in page
    assert "Did post-training give better utterance embeddings" in page and "with and without what" in page
    assert "with vs without the synthetic counting tasks" in result.human()


@pytest.mark.slow
def test_the_student_learns_what_a_teacher_knows_and_fbank_does_not(ray_cluster, tmp_path):
    """The demo on the `small` corpus (many sound-event test clips), its pretrained teachers and a 200-step
    student: frame_event (is a sound event active, every 0.25 s) is a teacher-knowledge task (CREPE beats
    fbank by more than the CI), and the student trained on the demo's shards is ahead of the random student
    on the mean margin over the knowledge tasks and on at least one of them (the issue's check).

    The random student is the trained student's own starting point (train.seed and the random student's
    seed are both 0), so a student that training did not change scores exactly what it does: margin 0 on
    every task, and the test fails. Measured draws at 200 steps (knowledge tasks event, event_count,
    speech_vs_audio, frame_event): six draws of the corpus' Ogg serial numbers (before the corpus' bytes
    were fixed) gave a mean margin of +0.029 to +0.043, ahead on 3 or 4; this run's fixed draw gives
    -0.033 / +0.100 / 0.000 / +0.012 (mean +0.020, ahead on 2) with the driver's torch on 2 threads, and
    -0.033 / +0.067 / -0.015 / -0.002 (mean +0.004, ahead on 1) on 1 thread (the codebook fit ran in the
    driver on its thread count, and its floats follow it: CI had run this check after a test left torch on
    one thread. The fit now takes every CPU of the process, and tests/conftest.py fails a test that leaves
    the thread count changed). "Ahead on at least half" held on 7 of those 8 draws, so it is not
    asserted; frame_event alone moved 0.78-0.85 against 0.80 (CI +-0.05)."""
    from spear.pipeline.demo import demo_config, run_demo

    cfg = demo_config(None, size="small")  # `spear demo --size small`: 4 x 32 codebooks, 200 steps
    assert (cfg.train.max_steps, cfg.mvq.codebook_size, cfg.mvq.kmeans_points_per_centroid) == (200, 32, 256)
    summary = run_demo(cfg, workdir=str(tmp_path / "spear-demo"), size="small", progress=False).to_dict()
    assert summary["train"]["step"] == 200
    checks = {r["task"]: r for r in summary["distillation_checks"]}
    frame_event = checks["frame_event"]
    assert frame_event["teacher"] == "teacher:crepe" and frame_event["teacher_beats_floor"], frame_event
    knowledge = [r for r in checks.values() if r["teacher_beats_floor"]]
    assert len(knowledge) >= 3, knowledge
    assert sum(r["margin"] for r in knowledge) > 0, knowledge
    assert any(r["margin"] > 0 for r in knowledge), knowledge
    # the two teachers side by side (evaluate.combined_teachers, on in the demo): the dual-teacher claim's ceiling
    from spear.evaluation.claims import combined_teacher_figures

    together = combined_teacher_figures(summary["evaluate"]["best"])
    assert together["combined"] == "teachers:resemblyzer+crepe" and together["gain"]["all"] is not None
    assert "What the teachers know together" in (tmp_path / "spear-demo" / "iter1" / "evaluation" / "index.html"
                                                 ).read_text()


def test_each_demo_size_scales_the_packaged_config_and_the_users_overrides_win(tmp_path):
    """`spear demo --size tiny` stopped at the codebook fit (16 x 256 codebooks need more frames than the
    tiny corpus holds): each size has its scale; --set still wins, and a config file is taken as written."""
    from spear.pipeline.demo import demo_config

    scale = {size: (c.mvq.codebook_size, c.mvq.speech_codebooks, c.train.max_steps)
             for size in ("tiny", "small", "demo") for c in [demo_config(size=size)]}
    assert scale == {"tiny": (16, 2, 3), "small": (32, 4, 200), "demo": (256, 16, 450)}
    assert demo_config(None, ("train.max_steps=7",), size="tiny").train.max_steps == 7
    own = tmp_path / "own.yaml"
    own.write_text("mvq: {codebook_size: 64}\n")
    assert demo_config(str(own), size="tiny").mvq.codebook_size == 64
    with pytest.raises(ValueError, match="unknown demo size 'huge'"):
        demo_config(size="huge")


def test_the_packaged_ablation_figures_are_the_default_demos(tmp_path):
    """A demo without --ablation shows the packaged figures: they must be of the demo's own teachers and
    training steps (figures of other teachers are not shown at all), with every student's means."""
    from spear.pipeline.demo import ABLATION_ROLES, demo_config, saved_ablation

    cfg = demo_config()
    figures = saved_ablation(str(tmp_path), cfg)  # an empty workdir: the packaged figures
    assert figures is not None and figures["from_this_run"] is False
    assert figures["train_steps"] == cfg.train.max_steps
    for group in ("all", "mixed"):
        assert set(figures["means"][group]) >= {"dual", "random_student", "fbank", *ABLATION_ROLES}
        assert figures["best"][group] in {"dual", *ABLATION_ROLES}
    # another demo's teachers, or another corpus size: nothing is shown rather than figures that do not belong to it
    assert saved_ablation(str(tmp_path), demo_config(None, ("teachers.audio.kind=fbank",))) is None
    assert saved_ablation(str(tmp_path), demo_config(size="small"), "small") is None
