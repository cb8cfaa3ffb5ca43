"""`spear run`'s re-use of an evaluation: keyed on what the results are computed from, robust to a moved
output folder, never a stale or broken one (no Ray: the provenance and the check are plain functions)."""

from __future__ import annotations

import json
import shutil

from spear.cluster.storage import Storage
from spear.evaluation.results import EvaluateSummary
from spear.pipeline.demo import demo_config
from spear.pipeline.run_job import evaluation_provenance, reusable_evaluation
from spear.schemas.student_export import encode_config


def _export(folder, checkpoint: str, weights_sha256: str = "ab" * 32) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(encode_config({
        "format": "spear-student", "format_version": 1, "weights_sha256": weights_sha256,
        "metadata": {"checkpoint": checkpoint, "step": 450}}))
    return str(folder)


def _evaluation(folder, provenance: dict) -> None:
    summary = EvaluateSummary(output=str(folder), report=str(folder / "index.html"),
                              results_json=str(folder / "results.json"),
                              probes=[{"task": "event", "model": "student", "layer": 1, "score": 0.5}],
                              best={"event": {"student": {"layer": 1, "score": 0.5}}}, tasks=[], models=[],
                              corpus={}, seeds=[0, 1], wall_seconds=12.5, provenance=provenance)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(summary.to_dict()))
    (folder / "index.html").write_text("<html></html>")


def test_provenance_names_the_weights_and_data_but_not_where_the_folder_is(tmp_path):
    storage = Storage()
    cfg = demo_config(None, ("evaluate.seeds=[0, 1]",))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "labels.jsonl").write_text('{"path": "a.wav"}\n')
    here = evaluation_provenance(cfg, _export(tmp_path / "a", "/old/place/checkpoint_1"), str(corpus), storage)
    moved = evaluation_provenance(cfg, _export(tmp_path / "b", "/new/place/checkpoint_1"), str(corpus), storage)
    assert here == moved and here["seeds"] == [0, 1] and here["student"]["metadata"] == {"step": 450}
    assert [t["kind"] for t in here["teachers"]] == ["resemblyzer", "crepe"]
    # a teacher actor's memory reservation is no input of the results
    reserved = demo_config(None, ("evaluate.seeds=[0, 1]", "teachers.audio.memory_gb=3"))
    assert evaluation_provenance(reserved, str(tmp_path / "a"), str(corpus), storage) == here
    other_weights = evaluation_provenance(cfg, _export(tmp_path / "c", "/x", "cd" * 32), str(corpus), storage)
    assert other_weights != here
    (corpus / "labels.jsonl").write_text('{"path": "b.wav"}\n')
    assert evaluation_provenance(cfg, str(tmp_path / "a"), str(corpus), storage)["labels_sha256"] != \
        here["labels_sha256"]


def test_an_evaluation_is_reused_only_when_its_provenance_matches_and_its_report_is_there(tmp_path):
    storage = Storage()
    provenance = {"student": {"weights_sha256": "ab" * 32}, "seeds": [0, 1], "manifests": []}
    _evaluation(tmp_path / "run" / "evaluation", provenance)
    shutil.move(tmp_path / "run", tmp_path / "moved")  # a moved output folder
    out = str(tmp_path / "moved" / "evaluation")

    reused = reusable_evaluation(out, provenance, storage)
    assert reused is not None and reused.wall_seconds == 12.5 and reused.best["event"]["student"]["score"] == 0.5
    assert (reused.output, reused.report) == (out, str(tmp_path / "moved" / "evaluation" / "index.html"))
    assert reused.results_json == str(tmp_path / "moved" / "evaluation" / "results.json")

    assert reusable_evaluation(out, {**provenance, "seeds": [0, 1, 2]}, storage) is None  # other settings
    assert reusable_evaluation(str(tmp_path / "nowhere"), provenance, storage) is None
    (tmp_path / "moved" / "evaluation" / "index.html").unlink()  # a report cut short
    assert reusable_evaluation(out, provenance, storage) is None
    (tmp_path / "moved" / "evaluation" / "index.html").write_text("<html></html>")
    (tmp_path / "moved" / "evaluation" / "results.json").write_text('{"provenance": ')  # broken results
    assert reusable_evaluation(out, provenance, storage) is None
    (tmp_path / "moved" / "evaluation" / "results.json").write_text(json.dumps({"provenance": provenance}))
    assert reusable_evaluation(out, provenance, storage) is None  # matching provenance, fields missing
