"""The evaluation report: files, sections from a training and a tokenize output, the text table,
S3 output, and the page rendered by headless Chromium (screenshot + every image loaded)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from spear.cluster.storage import Storage, join_uri
from spear.config import TeacherConfig
from spear.pipeline.evaluate_job import run_evaluate
from spear.evaluation.report import format_results_table, write_report
from support.browser import dump_dom, image_marks, run_chromium

TASKS = ["speech_vs_audio", "event_count", "frame_speech"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A training output (metrics written by the training job's own writer) and a tokenize
    output (a codebook usage plot written by the MVQ module's own plotter)."""
    from spear.models.mvq import plot_codebook_usage
    from spear.pipeline.train_job import write_metrics_report

    root = tmp_path_factory.mktemp("report-sources")
    train = root / "train-output"
    rows = [{"step": str(s), "loss": f"{6.0 * 0.97 ** s:.4f}", "mfcc/ce": f"{4.0 * 0.97 ** s:.4f}",
             "fbank/ce": f"{2.0 * 0.98 ** s:.4f}", "mfcc/acc_mean": f"{1 - 0.98 ** s:.4f}"} for s in range(1, 41)]
    write_metrics_report(rows, str(train / "metrics"), Storage())
    tokens = root / "tokens"
    codes = torch.randint(0, 64, (2000, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    plot_codebook_usage(codes, str(tokens / "codebooks" / "speech-0123456789abcdef-8x64" / "usage.png"), 64)
    return train, tokens


@pytest.fixture(scope="module")
def report(tmp_path_factory, sources):
    from spear.synthetic.corpus import generate_demo_corpus

    root = tmp_path_factory.mktemp("report")
    corpus = generate_demo_corpus(root / "corpus", size="tiny", seed=0)
    train, tokens = sources
    summary = run_evaluate(None, str(corpus.root), teachers=[TeacherConfig(kind="mfcc")], output=str(root / "out"),
                           seeds=(0, 1), random_student={"architecture": "zipformer2", "size": "tiny"},
                           tasks=TASKS, l2_grid=(1e-3, 1e-1), train_output=str(train), tokens_output=str(tokens),
                           num_threads=1, progress=False)
    return summary, root / "out"


def test_report_files_and_sections(report, sources):
    summary, out = report
    train, tokens = sources
    page = (out / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    expected = {f"task_{t}.png" for t in TASKS} | {"overview.png", "train_loss_curve.png",
                                                   "codebook_speech-0123456789abcdef-8x64.png"}
    assert set(images) == expected
    for name in images:
        assert (out / name).stat().st_size > 5000
    # the training curve and the codebook plot are the producers' own images, copied
    assert (out / "train_loss_curve.png").read_bytes() == (train / "metrics" / "loss_curve.png").read_bytes()
    usage = tokens / "codebooks" / "speech-0123456789abcdef-8x64" / "usage.png"
    assert (out / "codebook_speech-0123456789abcdef-8x64.png").read_bytes() == usage.read_bytes()
    training = summary.extras["training"]
    assert training["steps"] == 40 and training["first_loss"] == pytest.approx(6.0 * 0.97)
    assert "40 steps" in page and "results.json" in page
    # every probe is in the page's tables, and the corpus summary lists every format
    for r in summary.probes:
        assert f"<td>{r['score']:.3f}</td>" in page
    for fmt in summary.corpus["by_format"]:
        assert f"<td>{fmt}</td>" in page


def test_training_curve_is_drawn_from_the_csv_when_the_plot_is_missing(report, sources, tmp_path):
    summary, _ = report
    train, _ = sources
    only_csv = tmp_path / "train"
    (only_csv / "metrics").mkdir(parents=True)
    shutil.copy(train / "metrics" / "metrics.csv", only_csv / "metrics" / "metrics.csv")
    write_report(summary, str(tmp_path / "r"), train_output=str(only_csv))
    png = tmp_path / "r" / "train_loss_curve.png"
    assert png.stat().st_size > 5000 and png.read_bytes() != (train / "metrics" / "loss_curve.png").read_bytes()
    # without extras, the sections say what is missing instead of linking nothing
    write_report(summary.to_dict(), str(tmp_path / "bare"))
    page = (tmp_path / "bare" / "index.html").read_text()
    assert "no training output given" in page and "train_loss_curve.png" not in page


def test_format_results_table(report):
    summary, _ = report
    text = format_results_table(summary)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "random_student", "teacher:mfcc", "fbank"]
    order = [ln.split()[0] for ln in lines[1:4]]
    assert order == [t["name"] for t in summary.tasks] and sorted(order) == sorted(TASKS)
    b = summary.best["speech_vs_audio"]["fbank"]
    assert f"{b['score']:.3f}±{(b['ci'][1] - b['ci'][0]) / 2:.3f}" in lines[1 + order.index("speech_vs_audio")]
    rs = summary.best["event_count"]["random_student"]
    assert f"@L{rs['layer']}" in lines[1 + order.index("event_count")]
    assert format_results_table(summary.to_dict()) == text


def test_report_to_s3(report, s3_storage, s3_server):
    summary, out = report
    uri = f"s3://{s3_server.bucket}/eval-report"
    page_uri = write_report(summary, uri, storage=s3_storage)
    assert page_uri == join_uri(uri, "index.html")
    names = {e.uri.rsplit("/", 1)[-1] for e in s3_storage.list_files(uri)}
    assert names >= {"index.html", "results.json", "overview.png"} | {f"task_{t}.png" for t in TASKS}


# ----------------------------------------------------------------------------- headless Chromium


def test_report_renders_in_headless_chromium(report, tmp_path):
    import matplotlib.image as mpimg

    _, out = report
    page = out / "index.html"
    shot = tmp_path / "shot.png"
    run_chromium(page, tmp_path / "profile1", f"--screenshot={shot}", "--window-size=1200,2000",
                  "--virtual-time-budget=10000")
    assert shot.stat().st_size > 50_000
    pixels = mpimg.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1200)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not a blank page
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 200  # text, tables and plots

    dom = dump_dom(page, tmp_path / "profile2")
    marks = image_marks(dom)
    expected_imgs = re.findall(r"<img src='([^']+)'", page.read_text())
    assert sorted(marks) == sorted(expected_imgs) and len(marks) >= 6
    assert set(marks.values()) == {"1"}, marks
    assert f'data-images-checked="{len(marks)}"' in dom and 'id="broken-images"' not in dom


def test_chromium_check_detects_a_missing_plot(report, tmp_path):
    _, out = report
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "task_event_count.png").unlink()
    dom = dump_dom(copy / "index.html", tmp_path / "profile")
    marks = image_marks(dom)
    assert marks["task_event_count.png"] == "0"
    assert marks["task_speech_vs_audio.png"] == "1"
    assert 'id="broken-images"' in dom


def test_ablation_and_distillation_sections(report, tmp_path):
    """The "one teacher or two" section (figures, table, plot) and the distillation check, from a real
    probe table: the models of this report stand in for the three students."""
    from spear.evaluation.claims import ablation_figures, distillation_checks

    summary, _ = report
    d = summary.to_dict()
    students = {"dual": "random_student", "speech-only": "teacher:mfcc", "audio-only": "fbank"}
    figures = ablation_figures(d["best"], measured="2026-12-01T12:00:00Z", command="spear demo --ablation",
                               students=students, baselines=())
    assert set(figures["tasks"]) == set(TASKS) and figures["mixed_tasks"] == []
    mean_all = {lbl: np.mean([d["best"][t][m]["score"] for t in TASKS]) for lbl, m in students.items()}
    assert figures["means"]["all"] == pytest.approx(mean_all, abs=1e-5)
    assert figures["best"]["all"] == max(mean_all, key=mean_all.get) and figures["best"]["mixed"] is None
    # a best table with a "student": the check is computed per task against the random student and fbank
    best = {t: dict(d["best"][t], student=d["best"][t]["teacher:mfcc"]) for t in TASKS}
    checks = {c["task"]: c for c in distillation_checks(best)}
    for t in TASKS:
        mfcc, rand, fb = best[t]["teacher:mfcc"], best[t]["random_student"], best[t]["fbank"]
        hw = max((mfcc["ci"][1] - mfcc["ci"][0]) / 2, (fb["ci"][1] - fb["ci"][0]) / 2)
        assert checks[t]["teacher_beats_floor"] == (mfcc["score"] - fb["score"] > hw + 1e-9)
        assert checks[t]["margin"] == pytest.approx(mfcc["score"] - rand["score"], abs=1e-6)
        assert checks[t]["holds"] in ((True, False) if checks[t]["teacher_beats_floor"] else (None,))

    out = tmp_path / "out"
    write_report(dict(d, best=best), str(out), ablation=dict(figures, from_this_run=False))
    page = (out / "index.html").read_text()
    assert "One teacher or two" in page and "the last saved figures, measured 2026-12-01T12:00:00Z" in page
    assert "mean over all tasks" in page and (out / "ablation.png").stat().st_size > 5000
    assert "Did the teachers&#x27; knowledge reach the student?" in page or \
        "Did the teachers' knowledge reach the student?" in page
    assert page.count("not a test") == sum(c["holds"] is None for c in checks.values())
    saved = __import__("json").loads((out / "results.json").read_text())["extras"]
    assert saved["ablation"]["command"] == "spear demo --ablation" and len(saved["distillation_checks"]) == 3
    # headless Chromium loads every image of the page, the ablation plot among them
    dom = dump_dom(out / "index.html", tmp_path / "profile")
    marks = image_marks(dom)
    assert marks.get("ablation.png") == "1" and set(marks.values()) == {"1"}, marks


def test_distillation_check_shows_the_best_teachers_tokens():
    """Where tokens:<kind> rows were probed, each check carries the best teacher's tokens score and the
    table gains an "its tokens" column; without them the table is as before."""
    from spear.evaluation.claims import distillation_checks
    from spear.evaluation.report import _checks_html

    def entry(score):
        return {"score": score, "ci": [score - 0.02, score + 0.02]}

    best = {"word": {"student": entry(0.3), "random_student": entry(0.4), "fbank": entry(0.5),
                     "teacher:resemblyzer": entry(0.8), "teacher:crepe": entry(0.2),
                     "tokens:resemblyzer": entry(0.7), "tokens:crepe": entry(0.25)},
            "pitch": {"student": entry(0.6), "random_student": entry(0.5), "fbank": entry(0.7),
                      "teacher:resemblyzer": entry(0.4), "teacher:crepe": entry(0.9)}}
    checks = {c["task"]: c for c in distillation_checks(best)}
    assert checks["word"]["teacher"] == "teacher:resemblyzer" and checks["word"]["tokens_score"] == 0.7
    assert checks["pitch"]["teacher"] == "teacher:crepe" and checks["pitch"]["tokens_score"] is None
    html = _checks_html(list(checks.values()))
    assert "its tokens" in html and "0.700" in html
    without = {t: {m: e for m, e in v.items() if not m.startswith("tokens:")} for t, v in best.items()}
    assert "its tokens" not in _checks_html(distillation_checks(without))
