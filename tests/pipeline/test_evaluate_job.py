"""The evaluation job: linear probes (separable / permuted / deterministic), then run_evaluate on
the tiny demo corpus with a tiny exported student, the weight-free teachers, raw fbank and
user manifests (CSV and JSONL)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from spear.models.probes import bootstrap_ci, fit_probe, macro_f1, run_probe, validation_carve
from spear.config import TeacherConfig
from spear.pipeline.evaluate_job import (
    BUILTIN_TASKS,
    EvaluateSummary,
    _Items,
    frame_grid,
    hash_split,
    load_manifest_task,
    run_evaluate,
)
from spear.cluster.storage import Storage

# ----------------------------------------------------------------------------- probes


def _blobs(n: int, dim: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    y = rng.integers(0, classes, n)
    return centres[y] + rng.normal(size=(n, dim)), np.array([f"c{v}" for v in y])


def test_probe_fits_a_separable_problem():
    x, y = _blobs(400, 16, 4, spread=4.0, seed=0)
    res = run_probe(x[:250], y[:250], x[250:], y[250:], seeds=(0, 1, 2))
    assert res.score >= 0.98
    assert res.ci[0] <= res.score <= res.ci[1] <= 1.0
    assert res.macro_f1 >= 0.98
    assert (res.num_train, res.num_test, res.num_classes) == (250, 150, 4)
    assert len(res.seed_scores) == 3 and len(res.l2) == 3
    assert 0.0 < res.chance < 0.5  # majority class of 4 roughly balanced ones
    assert set(res.test_predictions[0]) <= set(y)


def test_probe_on_permuted_labels_is_near_chance():
    x, y = _blobs(800, 16, 4, spread=4.0, seed=1)
    y_perm = np.random.default_rng(5).permutation(y)
    res = run_probe(x[:400], y_perm[:400], x[400:], y_perm[400:], seeds=(0, 1))
    assert abs(res.score - 0.25) < 0.1, res.score
    # the same features with the true labels are decodable: the probe, not the data, is at chance
    assert run_probe(x[:400], y[:400], x[400:], y[400:], seeds=(0,)).score > 0.95


def test_probe_is_deterministic_per_seed():
    x, y = _blobs(300, 12, 3, spread=0.8, seed=2)  # overlapping classes: the L2 choice matters
    a = run_probe(x[:200], y[:200], x[200:], y[200:], seeds=(0, 1, 2))
    b = run_probe(x[:200], y[:200], x[200:], y[200:], seeds=(0, 1, 2))
    assert a.to_dict() == b.to_dict()
    # one seed's probe does not depend on the other seeds of the call
    for k, s in enumerate((0, 1, 2)):
        alone = run_probe(x[:200], y[:200], x[200:], y[200:], seeds=(s,))
        assert alone.seed_scores == [a.seed_scores[k]] and alone.l2 == [a.l2[k]]
        assert np.array_equal(alone.test_predictions[0], a.test_predictions[k])
    # different seeds carve different validation sets
    ids = np.unique(y[:200], return_inverse=True)[1]
    assert not np.array_equal(validation_carve(ids, 0), validation_carve(ids, 1))


def test_unseen_test_labels_count_as_errors():
    x = np.array([[0.0], [0.1], [3.0], [3.1], [0.05], [5.0]])
    y = np.array(["a", "a", "b", "b", "a", "z"])
    res = run_probe(x[:4], y[:4], x[4:], y[4:], seeds=(0,))
    assert res.score == pytest.approx(0.5)  # "a" right, "z" (never trained on) wrong
    assert res.test_predictions[0][0] == "a"
    p = fit_probe(x[:4], y[:4], l2=1e-3)
    assert p.predict(np.array([[0.0], [3.0]])).tolist() == ["a", "b"]


def test_grouped_validation_and_bootstrap_keep_groups_whole():
    y = np.repeat([0, 1], 50)
    groups = np.arange(100) // 10
    for seed in range(4):
        val = validation_carve(y, seed, 0.2, groups)
        for g in np.unique(groups):
            assert len(set(val[groups == g])) == 1  # a group is all-validation or all-train
        assert val.sum() == 20
    # a perfectly consistent group structure gives a degenerate interval; mixed values do not
    assert bootstrap_ci(np.ones(30), np.arange(30) // 3) == (1.0, 1.0)
    lo, hi = bootstrap_ci(np.r_[np.ones(15), np.zeros(15)], np.arange(30) // 3)
    assert 0.0 < lo < 0.5 < hi < 1.0
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])) == 1.0


def test_hash_split_is_stable_and_near_20_percent():
    keys = [f"clips/{i:05d}.wav" for i in range(2000)]
    splits = [hash_split(k) for k in keys]
    assert splits == [hash_split(k) for k in keys]
    assert 0.17 < splits.count("test") / len(keys) < 0.23
    assert frame_grid(1.0).tolist() == [0.125, 0.375, 0.625, 0.875]


# ----------------------------------------------------------------------------- run_evaluate


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from spear.pipeline.demo_corpus import generate_demo_corpus

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
    from spear.models.student import build_encoder, export_student

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
    # best = each model's best layer
    for t in tasks:
        rows = [r for r in summary.probes if r["task"] == t and r["model"] == "student"]
        top = max(rows, key=lambda r: r["score"])
        assert summary.best[t]["student"]["score"] == top["score"]
        assert summary.best[t]["fbank"]["layer"] is None


def test_probe_scores_reflect_the_audio(evaluated):
    summary, _, _ = evaluated
    score = {(r["task"], r["model"], r["layer"]): r["score"] for r in summary.probes}
    # speech-only vs audio clips are told apart from raw log-mel energies
    assert score[("speech_vs_audio", "fbank", None)] >= 0.8
    # the JSONL manifest asks the same question as speech_vs_audio (label = domain)
    assert score[("kind", "fbank", None)] >= 0.6
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


def test_manifest_errors_are_clear(tmp_path):
    bad_split = tmp_path / "a.csv"
    bad_split.write_text("uri,label,split\nx.wav,yes,holdout\n")
    with pytest.raises(ValueError, match="split 'holdout'"):
        load_manifest_task(str(bad_split), _Items(), Storage())
    no_label = tmp_path / "b.jsonl"
    no_label.write_text(json.dumps({"uri": "x.wav"}) + "\n")
    with pytest.raises(ValueError, match="needs `uri` and `label`"):
        load_manifest_task(str(no_label), _Items(), Storage())
    with pytest.raises(ValueError, match=".csv, .tsv or .jsonl"):
        (tmp_path / "c.txt").write_text("x")
        load_manifest_task(str(tmp_path / "c.txt"), _Items(), Storage())
    ok = tmp_path / "sub" / "d.csv"
    ok.parent.mkdir()
    ok.write_text("path,label,split\nclips/x.wav,a,dev\n/abs/y.wav,b,test\n")
    items = _Items()
    task = load_manifest_task(str(ok), items, Storage())
    assert task.name == "d" and task.splits == ["train", "test"] and task.labels == ["a", "b"]
    assert items.uris == [str(tmp_path / "sub" / "clips" / "x.wav"), "/abs/y.wav"]
    assert len(task.items) == 2


def test_student_with_the_random_students_weights_scores_the_same(tiny_corpus, tmp_path):
    """The exported-student path (safetensors export, load_student) and the in-memory random
    student give the same features for the same weights, so the same probe scores."""
    from spear.models.student import build_encoder, export_student
    from spear.pipeline.evaluate_job import RANDOM_STUDENT_SEED

    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_STUDENT_SEED)
        export_student(build_encoder("zipformer2", "tiny"), str(tmp_path / "student"))
    summary = run_evaluate(str(tmp_path / "student"), str(tiny_corpus.root), output=str(tmp_path / "r"), seeds=(0,),
                           fbank_floor=False, tasks=["speech_vs_audio", "frame_speech"], l2_grid=(1e-2,),
                           layers=[1, 5], num_threads=1, progress=False)
    rows = {m: {(r["task"], r["layer"]): r["seed_scores"] for r in summary.probes if r["model"] == m}
            for m in ("student", "random_student")}
    assert len(rows["student"]) == 4 and rows["student"] == rows["random_student"]
