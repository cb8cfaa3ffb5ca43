"""`spear demo`: the embedded default, end to end on one machine.

generate a labelled demo corpus (cached) -> tokenize (mfcc + fbank teachers, MVQ) -> train a tiny
student on Ray Train -> export it -> probe the student, a random student, the teachers and raw
fbank -> HTML report. ``iteration=2`` makes the first iteration's student the speech teacher (HuBERT-
style refinement): one switch, everything else unchanged.

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
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from spear.cluster.storage import Storage
from spear.config import SourceConfig, SpearConfig, TeacherConfig, load_config
from spear.evaluation.tasks import TaskSources, probe_test_uris
from spear.pipeline.run_job import EXPORT_DIR, STUDENT_DIR, RunSummary, run_all
from spear.synthetic.corpus import DemoCorpus, generate_demo_corpus

DEMO_CONFIG = "demo.yaml"
PRETRAIN_DIR = "pretrain"


def demo_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> SpearConfig:
    """The demo's config: the packaged demo.yaml (or ``path``) with overrides."""
    if path is None:
        with resources.as_file(resources.files("spear.pipeline") / DEMO_CONFIG) as p:
            return load_config(p, overrides)
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

    def to_dict(self) -> dict[str, Any]:
        d = {"workdir": self.workdir, "iteration": self.iteration, "corpus": self.corpus, **self.run.to_dict()}
        ev = d.get("evaluate") or {}
        d["probes"], d["report"] = ev.get("probes", []), ev.get("report")
        return d

    def human(self) -> str:
        c = self.corpus
        held = (f"; {c['held_out_test_files']} probe test files held out of pre-training"
                if c.get("held_out_test_files") is not None else "")
        return (f"demo (iteration {self.iteration}) in {self.workdir}: corpus of {c['num_files']} files, "
                f"{c['total_seconds'] / 60:.1f} min of audio{held}\n" + self.run.human())


def run_demo(cfg: SpearConfig, *, workdir: str = "spear-demo", size: str = "demo", iteration: int = 1,
             progress: bool = True) -> DemoSummary:
    """Generate the demo corpus under ``workdir`` and run the whole pipeline on it (:func:`run_all`)."""
    if iteration not in (1, 2):
        raise ValueError("iteration must be 1 or 2")
    workdir = os.path.abspath(workdir)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    corpus = generate_demo_corpus(os.path.join(workdir, "corpus"), size=size, seed=0,
                                  progress=lambda line: log(f"[corpus] {line}"))
    cfg = cfg.model_copy(deep=True)
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
    return DemoSummary(workdir=workdir, iteration=iteration, corpus=corpus_info, run=run)
