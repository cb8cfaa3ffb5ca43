"""`spear demo`: the embedded default, end to end on one machine.

generate a labelled demo corpus (cached) -> tokenize (mfcc + fbank teachers, MVQ) -> train a tiny
student on Ray Train -> export it -> probe the student, a random student, the teachers and raw
fbank -> HTML report. ``iteration=2`` makes the first iteration's student the speech teacher (HuBERT-
style refinement): one switch, everything else unchanged.

Layout under ``workdir``::

    corpus/                      the demo corpus (labels.jsonl, speech/, audio/)
    iter1/                       `spear run`'s layout: tokens/, student/, student/export/, evaluation/
    iter2/                       the second iteration
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from spear.config import SourceConfig, SpearConfig, TeacherConfig, load_config
from spear.pipeline.run_job import EXPORT_DIR, STUDENT_DIR, RunSummary, run_all
from spear.synthetic.corpus import generate_demo_corpus

DEMO_CONFIG = "demo.yaml"


def demo_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> SpearConfig:
    """The demo's config: the packaged demo.yaml (or ``path``) with overrides."""
    if path is None:
        with resources.as_file(resources.files("spear.pipeline") / DEMO_CONFIG) as p:
            return load_config(p, overrides)
    return load_config(path, overrides)


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
        return (f"demo (iteration {self.iteration}) in {self.workdir}: corpus of {c['num_files']} files, "
                f"{c['total_seconds'] / 60:.1f} min of audio\n" + self.run.human())


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
    if not cfg.corpus.sources:
        cfg.corpus.sources = [SourceConfig(uri=str(corpus.speech_dir), domain="speech", name="demo-speech"),
                              SourceConfig(uri=str(corpus.audio_dir), domain="audio", name="demo-audio")]
    if iteration == 2:
        first = os.path.join(workdir, "iter1", STUDENT_DIR, EXPORT_DIR)
        if not os.path.isfile(os.path.join(first, "config.json")):
            raise FileNotFoundError(f"iteration 2 needs the first iteration's student at {first}: run `spear demo` first")
        cfg.teachers.speech = TeacherConfig(kind="student", path=first)
    cfg.output = os.path.join(workdir, f"iter{iteration}")
    run = run_all(cfg, progress=progress)
    corpus_info = {"root": str(corpus.root), "num_files": corpus.num_files, "total_seconds": corpus.total_seconds}
    return DemoSummary(workdir=workdir, iteration=iteration, corpus=corpus_info, run=run)
