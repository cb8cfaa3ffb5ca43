"""`spear demo`: the embedded default, end to end on one machine.

generate a labelled demo corpus (cached) -> tokenize (mfcc + fbank teachers, MVQ) -> train a tiny
student on Ray Train -> export it -> probe the student, a random student, the teachers and raw
fbank -> HTML report. ``iteration=2`` makes the first iteration's student the speech teacher (HuBERT-
style refinement): one switch, everything else unchanged.

Layout under ``workdir``::

    corpus/                      the demo corpus (labels.jsonl, speech/, audio/)
    iter1/tokens, iter1/student, iter1/export, iter1/report
    iter2/...                    the second iteration
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from spear.pipeline.config import SourceConfig, SpearConfig, TeacherConfig, load_config

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
    tokenize: Any
    train: Any
    export: Any
    evaluate: Any

    def to_dict(self) -> dict[str, Any]:
        ev = self.evaluate.to_dict()
        return {"workdir": self.workdir, "iteration": self.iteration, "corpus": self.corpus,
                "tokenize": self.tokenize.to_dict(), "train": self.train.to_dict(), "export": self.export.to_dict(),
                "evaluate": ev, "probes": ev["probes"], "report": ev["report"]}

    def human(self) -> str:
        t, tr = self.tokenize, self.train
        lines = [
            f"demo (iteration {self.iteration}) in {self.workdir}",
            f"corpus: {self.corpus['num_files']} files, {self.corpus['total_seconds'] / 60:.1f} min of audio",
            f"tokenize: {t.committed_objects} objects, {t.committed_segments} segments, token version {t.token_version}",
            f"train: step {tr.step}, loss {tr.first_loss:.3f} -> {tr.last_loss:.3f}",
            "",
            self.evaluate.human(),
        ]
        return "\n".join(lines)


def run_demo(cfg: SpearConfig, *, workdir: str = "spear-demo", size: str = "demo", iteration: int = 1,
             progress: bool = True) -> DemoSummary:
    """Run the whole pipeline on the demo corpus under ``workdir``."""
    import sys

    from spear.cluster.ray_runtime import ray_session
    from spear.pipeline.demo_corpus import generate_demo_corpus
    from spear.pipeline.evaluate_job import run_evaluate
    from spear.pipeline.tokenize_job import run_tokenize
    from spear.pipeline.train_job import run_export, run_train

    if iteration not in (1, 2):
        raise ValueError("iteration must be 1 or 2")
    workdir = os.path.abspath(workdir)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    corpus = generate_demo_corpus(os.path.join(workdir, "corpus"), size=size, seed=0,
                                  progress=lambda line: log(f"[corpus] {line}"))
    it = os.path.join(workdir, f"iter{iteration}")
    cfg = cfg.model_copy(deep=True)
    if not cfg.corpus.sources:
        cfg.corpus.sources = [SourceConfig(uri=str(corpus.speech_dir), domain="speech", name="demo-speech"),
                              SourceConfig(uri=str(corpus.audio_dir), domain="audio", name="demo-audio")]
    if iteration == 2:
        first = os.path.join(workdir, "iter1", "export")
        if not os.path.isfile(os.path.join(first, "config.json")):
            raise FileNotFoundError(f"iteration 2 needs the first iteration's student at {first}: run `spear demo` first")
        cfg.teachers.speech = TeacherConfig(kind="student", path=first)

    cfg.output = os.path.join(it, "tokens")
    with ray_session(cfg.ray):  # one Ray for both jobs (each would otherwise start and stop its own)
        tok = run_tokenize(cfg, progress=progress)
        cfg.train.shards = cfg.output
        cfg.output = os.path.join(it, "student")
        tr = run_train(cfg, progress=progress)
    export = run_export(cfg.output, os.path.join(it, "export"))
    teachers = [t for t in (cfg.teachers.speech, cfg.teachers.audio) if t is not None]
    ev = run_evaluate(os.path.join(it, "export"), str(corpus.root), teachers=teachers,
                      output=os.path.join(it, "report"), seeds=cfg.evaluate.seeds, manifests=cfg.evaluate.manifests,
                      train_output=cfg.output, tokens_output=cfg.train.shards, num_threads=1, progress=progress)
    corpus_info = {"root": str(corpus.root), "num_files": corpus.num_files, "total_seconds": corpus.total_seconds}
    return DemoSummary(workdir=workdir, iteration=iteration, corpus=corpus_info, tokenize=tok, train=tr,
                       export=export, evaluate=ev)
