"""The evaluation job: run_evaluate on the tiny demo corpus with a tiny exported student, the
weight-free teachers, raw fbank and user manifests (CSV and JSONL)."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from spear.config import TeacherConfig
from spear.evaluation.results import EvaluateSummary
from spear.evaluation.tasks import BUILTIN_TASKS, hash_split
from spear.pipeline.evaluate_job import run_evaluate


# ----------------------------------------------------------------------------- run_evaluate


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from spear.synthetic.corpus import generate_demo_corpus

    return generate_demo_corpus(tmp_path_factory.mktemp("eval") / "corpus", size="tiny", seed=0)


def _write_manifests(corpus, folder) -> tuple[str, str]:
    """speech_or_not.csv (relative paths, explicit split) and kind.jsonl (absolute paths, hash split)."""
    rows = corpus.labels()
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "speech_or_not.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "label", "split"])
        w.writeheader()
        for r in rows:
            rel = os.path.relpath(corpus.root / r["path"], folder)
            w.writerow({"uri": rel, "label": "speech" if r["has_speech"] else "other", "split": r["split"]})
    jsonl_path = folder / "kind.jsonl"
    with open(jsonl_path, "w") as f:
        for r in rows:
            f.write(json.dumps({"uri": str(corpus.root / r["path"]), "label": r["domain"]}) + "\n")
    return str(csv_path), str(jsonl_path)


@pytest.fixture(scope="module")
def evaluated(tiny_corpus, tmp_path_factory):
    from spear.models.student import build_encoder
    from spear.stages.artefacts import export_student

    root = tmp_path_factory.mktemp("eval-run")
    with torch.random.fork_rng():
        torch.manual_seed(123)
        export_student(build_encoder("zipformer2", "tiny"), str(root / "student"))
    manifests = _write_manifests(tiny_corpus, root / "manifests")
    summary = run_evaluate(str(root / "student"), str(tiny_corpus.root),
                           teachers=[TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank")],
                           output=str(root / "report"), seeds=(0, 1), l2_grid=(1e-3, 1e-1), manifests=manifests,
                           num_threads=1, progress=False)
    return summary, root, manifests


def test_every_task_and_model_is_probed(evaluated):
    summary, _, _ = evaluated
    assert isinstance(summary, EvaluateSummary)
    no_carve = sorted({r["task"] for r in summary.probes if r["val_score"] is None})
    # no validation carve exactly where no training class has 3 items (20 % of 2 rounds to 0; tiny corpus: word, ...)
    singletons = sorted(t["name"] for t in summary.tasks if t["level"] == "utterance"
                        and max(t["class_counts"]["train"].values()) <= 2)
    assert no_carve == singletons and "speech_vs_audio" not in no_carve
    tasks = list(BUILTIN_TASKS) + ["speech_or_not", "kind"]
    student = [m for m in summary.models if m["name"] == "student"][0]
    assert student["layers"] == [1, 2, 3, 4, 5]
    expected = {(t, "student", k) for t in tasks for k in range(1, 6)}
    expected |= {(t, "random_student", k) for t in tasks for k in range(1, 6)}
    expected |= {(t, m, None) for t in tasks for m in ("teacher:mfcc", "teacher:fbank", "fbank")}
    got = [(r["task"], r["model"], r["layer"]) for r in summary.probes]
    assert sorted(got, key=str) == sorted(expected, key=str) and len(got) == len(set(got))
    assert summary.skipped_tasks == [] and summary.skipped_files == []
    for r in summary.probes:
        assert 0.0 <= r["score"] <= 1.0 and r["metric"] == "accuracy"
        lo, hi = r["ci"]
        assert 0.0 <= lo <= r["score"] <= hi <= 1.0
        assert len(r["seed_scores"]) == 2 and r["score"] == pytest.approx(np.mean(r["seed_scores"]))
        assert r["num_test"] > 0 and r["num_classes"] >= 2
        assert r["level"] == ("frame" if r["task"].startswith("frame_") else "utterance")
    # best = each model's layer chosen on validation (then lower validation loss, then first), at its test score
    for t in tasks:
        rows = [r for r in summary.probes if r["task"] == t and r["model"] == "student"]
        assert all(len(r["val_seed_scores"]) == 2 for r in rows)
        # (a task whose training classes all have one item has no validation carve: the first layer)
        top = max(rows, key=lambda r: (-1.0, 0.0, -r["layer"]) if r["val_score"] is None
                  else (r["val_score"], -r["val_loss"], -r["layer"]))
        assert summary.best[t]["student"]["layer"] == top["layer"]
        assert summary.best[t]["student"]["score"] == top["score"] and summary.best[t]["student"]["ci"] == top["ci"]
        assert summary.best[t]["fbank"]["layer"] is None


def test_probe_scores_reflect_the_audio(evaluated, tiny_corpus):
    summary, _, _ = evaluated
    score = {(r["task"], r["model"], r["layer"]): r["score"] for r in summary.probes}
    # speech-only vs audio clips are told apart from raw log-mel energies
    assert score[("speech_vs_audio", "fbank", None)] >= 0.8
    # the JSONL manifest asks the same question as speech_vs_audio (label = domain), every file under its
    # domain. Its split is a hash of each absolute path, so its 4-8 test items of 31 change with the temporary
    # folder, and so would a score on them (0.5 on 4 items in one CI run): the labels are what is fixed.
    kind = next(t for t in summary.tasks if t["name"] == "kind")["class_counts"]
    domains = Counter(r["domain"] for r in tiny_corpus.labels())
    assert {d: kind["train"].get(d, 0) + kind["test"].get(d, 0) for d in domains} == domains
    assert all(r["num_train"] + r["num_test"] == sum(domains.values()) for r in summary.probes if r["task"] == "kind")
    # frames inside / outside speech: the floor is better than always answering the majority class
    frame = [r for r in summary.probes if r["task"] == "frame_speech" and r["model"] == "fbank"][0]
    assert frame["score"] > frame["chance"]


def test_tasks_splits_and_corpus_summary(evaluated, tiny_corpus):
    summary, _, (csv_path, jsonl_path) = evaluated
    rows = tiny_corpus.labels()
    info = {t["name"]: t for t in summary.tasks}
    n = lambda counts: sum(counts.values())  # noqa: E731
    # the CSV's explicit split is the corpus split
    assert n(info["speech_or_not"]["class_counts"]["test"]) == sum(r["split"] == "test" for r in rows)
    assert info["speech_or_not"]["source"] == csv_path
    # the JSONL has no split: a hash of each uri string decides
    expected_test = sum(hash_split(str(tiny_corpus.root / r["path"])) == "test" for r in rows)
    assert n(info["kind"]["class_counts"]["test"]) == expected_test
    assert n(info["word"]["class_counts"]["train"]) + n(info["word"]["class_counts"]["test"]) == \
        sum(r["kind"] == "word" for r in rows)
    assert info["frame_speech"]["level"] == "frame"
    c = summary.corpus
    assert c["files"] == len(rows)  # manifests point at the same files: decoded once
    assert c["minutes"] == pytest.approx(tiny_corpus.total_seconds / 60, rel=0.02)
    assert set(c["by_domain"]) == {"speech", "audio"}
    assert sum(v["files"] for v in c["by_format"].values()) == len(rows)
    assert set(c["by_sample_rate"]) == {str(r) for r in {r["sample_rate"] for r in rows}}
    by_model = {m["name"]: m for m in summary.models}
    assert by_model["random_student"]["seed"] == 0
    assert by_model["teacher:fbank"]["frame_rate"] == 25.0 and by_model["fbank"]["frame_rate"] == 100.0
    assert by_model["fbank"]["dims"] == [128]


def test_report_and_results_json_are_written(evaluated):
    summary, root, _ = evaluated
    report = root / "report"
    assert summary.report == str(report / "index.html")
    page = (report / "index.html").read_text()
    for t in list(BUILTIN_TASKS) + ["speech_or_not", "kind"]:
        assert (report / f"task_{t}.png").stat().st_size > 5000
        assert f"src='task_{t}.png'" in page
    assert (report / "overview.png").is_file()
    data = json.loads((report / "results.json").read_text())
    assert data["probes"] == json.loads(json.dumps(summary.to_dict()))["probes"]
    assert set(data) >= {"probes", "best", "report", "tasks", "models", "corpus", "seeds"}
    text = summary.human()
    assert "speech_vs_audio" in text and "teacher:mfcc" in text and str(report / "index.html") in text


def test_layer_subset_random_student_only_and_task_filter(tiny_corpus, tmp_path):
    summary = run_evaluate(None, str(tiny_corpus.root), output=str(tmp_path / "r"), seeds=(0,),
                           random_student={"architecture": "transformer", "size": "tiny"}, layers=[2],
                           fbank_floor=False, tasks=["speech_vs_audio", "frame_event"], l2_grid=(1e-2,),
                           num_threads=1, progress=False)
    assert sorted((r["task"], r["model"], r["layer"]) for r in summary.probes) == [
        ("frame_event", "random_student", 2), ("speech_vs_audio", "random_student", 2)]
    assert summary.models[0]["encoder"] == {"architecture": "transformer", "size": "tiny"}
    with pytest.raises(ValueError, match="needs student_dir"):
        run_evaluate(None, str(tiny_corpus.root), output=str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        run_evaluate(None, str(tiny_corpus.root), output=str(tmp_path / "x"), tasks=["nope"],
                     random_student={"architecture": "transformer", "size": "tiny"}, progress=False)
    with pytest.raises(FileNotFoundError, match="labels.jsonl"):
        run_evaluate(None, str(tmp_path), output=str(tmp_path / "x"), random_student=False, progress=False)


def test_teachers_side_by_side_are_probed_after_the_last_teacher(tiny_corpus, tmp_path):
    """`combined_teachers`: one more row, the teachers' features concatenated (dims add up), before fbank; the
    report and the text summary show its means against each teacher; one teacher alone gives no such row."""
    teachers = [TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank")]
    summary = run_evaluate(None, str(tiny_corpus.root), teachers=teachers, output=str(tmp_path / "r"), seeds=(0,),
                           random_student=False, tasks=["speech_vs_audio", "frame_event"], l2_grid=(1e-2,),
                           combined_teachers=True, num_threads=1, progress=False)
    info = {m["name"]: m for m in summary.models}
    assert list(info) == ["teacher:mfcc", "teacher:fbank", "teachers:mfcc+fbank", "fbank"]
    assert info["teachers:mfcc+fbank"]["kind"] == "teachers_combined"
    assert info["teachers:mfcc+fbank"]["dims"] == [info["teacher:mfcc"]["dims"][0] + info["teacher:fbank"]["dims"][0]]
    assert {t: set(m) for t, m in summary.best.items()} == {
        t: {"teacher:mfcc", "teacher:fbank", "teachers:mfcc+fbank", "fbank"} for t in ("speech_vs_audio", "frame_event")}
    page = (tmp_path / "r" / "index.html").read_text()
    assert "What the teachers know together" in page and "gain over the best teacher" in page
    assert "teachers:mfcc+fbank" in summary.human()
    from spear.evaluation.claims import combined_teacher_figures

    f = combined_teacher_figures(summary.best)
    scores = {m: np.mean([summary.best[t][m]["score"] for t in summary.best]) for m in info}
    assert f["means"]["all"] == pytest.approx(scores) and f["means"]["mixed"]["teachers:mfcc+fbank"] is None
    assert f["gain"]["all"] == pytest.approx(scores["teachers:mfcc+fbank"] - max(scores["teacher:mfcc"],
                                                                                 scores["teacher:fbank"]))
    one = run_evaluate(None, str(tiny_corpus.root), teachers=teachers[:1], output=str(tmp_path / "r1"), seeds=(0,),
                       random_student=False, tasks=["speech_vs_audio"], l2_grid=(1e-2,), combined_teachers=True,
                       num_threads=1, progress=False)
    assert [m["name"] for m in one.models] == ["teacher:mfcc", "fbank"]


def test_student_with_the_random_students_weights_scores_the_same(tiny_corpus, tmp_path):
    """The exported-student path (safetensors export, load_student) and the in-memory random
    student give the same features for the same weights, so the same probe scores."""
    from spear.models.student import build_encoder
    from spear.stages.artefacts import export_student
    from spear.evaluation.features import RANDOM_STUDENT_SEED

    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_STUDENT_SEED)
        export_student(build_encoder("zipformer2", "tiny"), str(tmp_path / "student"))
    summary = run_evaluate(str(tmp_path / "student"), str(tiny_corpus.root), output=str(tmp_path / "r"), seeds=(0,),
                           fbank_floor=False, tasks=["speech_vs_audio", "frame_speech"], l2_grid=(1e-2,),
                           layers=[1, 5], num_threads=1, progress=False)
    rows = {m: {(r["task"], r["layer"]): r["seed_scores"] for r in summary.probes if r["model"] == m}
            for m in ("student", "random_student")}
    assert len(rows["student"]) == 4 and rows["student"] == rows["random_student"]


def test_a_released_spear_model_is_probed_beside_the_others(tiny_corpus, tmp_path):
    """A released model in the authors' icefall layout is probed layer by layer as ``released:<name>``
    and scores exactly as its conversion to a spear export probed as the student (same weights,
    same frontend: the authors' mel band)."""
    from spear.models.student import build_encoder
    from spear.pipeline.convert_job import run_convert
    from spear.stages.artefacts import save_spear_release

    torch.manual_seed(5)
    release = str(tmp_path / "spear-tiny.pt")
    save_spear_release(build_encoder("zipformer2", "tiny"), release, layout="icefall")
    run_convert(release, str(tmp_path / "export"), to="spear")
    summary = run_evaluate(str(tmp_path / "export"), str(tiny_corpus.root), output=str(tmp_path / "r"), seeds=(0,),
                           random_student=False, released=[release], fbank_floor=False,
                           tasks=["speech_vs_audio", "frame_speech"], l2_grid=(1e-2,), layers=[1, 5],
                           num_threads=1, progress=False)
    rows = {m: {(r["task"], r["layer"]): r["seed_scores"] for r in summary.probes if r["model"] == m}
            for m in ("released:spear-tiny.pt", "student")}
    assert len(rows["released:spear-tiny.pt"]) == 4 and rows["released:spear-tiny.pt"] == rows["student"]
    info = next(m for m in summary.models if m["name"] == "released:spear-tiny.pt")
    assert info["kind"] == "released" and info["conversion"]["layout"] == "icefall"


def test_probe_tokens_renders_each_teacher_through_its_codebooks(demo_tokens, tmp_path):
    """`probe_tokens`: each teacher of the token set, encoded with its codebooks and decoded back, is
    probed as tokens:<kind> after the teachers; its frames are close to the teacher's, not equal."""
    from spear.cluster.storage import Storage
    from spear.evaluation.clips import decode_clips
    from spear.evaluation.features import teacher_extractor, token_target_extractor
    from spear.pipeline.evaluate_job import token_targets
    from spear.stages.audio import pcm16_to_float

    corpus, tokens_uri, _ = demo_tokens
    targets = token_targets(tokens_uri, Storage())
    assert [(t.role, t.teacher.kind) for t in targets] == [("speech", "mfcc"), ("audio", "fbank")]
    summary = run_evaluate(None, str(corpus.root), teachers=[TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank")],
                           output=str(tmp_path / "report"), seeds=(0,), l2_grid=(1e-2,), random_student=False,
                           tokens_output=tokens_uri, probe_tokens=True, tasks=["speech_vs_audio"], num_threads=1,
                           progress=False)
    info = {m["name"]: m for m in summary.models}
    assert list(info) == ["teacher:mfcc", "teacher:fbank", "tokens:mfcc", "tokens:fbank", "fbank"]
    assert (info["teacher:mfcc"]["kind"], info["tokens:mfcc"]["kind"]) == ("teacher", "tokens")
    assert info["tokens:mfcc"]["teacher_kind"] == "mfcc" and info["tokens:mfcc"]["role"] == "speech"
    assert (info["tokens:mfcc"]["num_codebooks"], info["tokens:fbank"]["num_codebooks"]) == (8, 4)
    assert info["tokens:mfcc"]["codebooks"] == targets[0].codebooks
    assert {"teacher:mfcc", "tokens:mfcc"} <= set(summary.best["speech_vs_audio"])

    # the rendered frames: the teacher's, up to the codebooks' reconstruction error
    clip = next(r for r in corpus.labels() if r["domain"] == "speech")
    clips, _ = decode_clips({0: str(corpus.root / clip["path"])}, Storage())
    wav = torch.from_numpy(pcm16_to_float(clips[0].pcm))[None]
    lengths = torch.tensor([wav.shape[1]])
    teacher = teacher_extractor("t", targets[0].teacher, Storage(), torch.device("cpu"))
    tokens = token_target_extractor("q", targets[0], Storage(), torch.device("cpu"))
    (x,), n = teacher.fn(wav, lengths)
    (y,), m = tokens.fn(wav, lengths)
    assert torch.equal(n, m) and y.shape == x.shape
    x, y = x[0, : int(n[0])], y[0, : int(n[0])]
    rel = float(((y - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert 0.0 < rel < 0.5, rel
    with pytest.raises(ValueError, match="probe_tokens needs tokens_output"):
        run_evaluate(None, str(corpus.root), output=str(tmp_path / "r2"), random_student=False, probe_tokens=True)
