"""`spear run`: the whole pipeline on one config, tokenize -> train -> export -> evaluate.

The same config runs on the embedded local Ray and on a remote cluster (only
``ray.address`` / ``--address`` differs). Layout under ``output``::

    OUTPUT/tokens/            the token dataset (`spear tokenize --output`), unless train.shards names another
    OUTPUT/student/           training checkpoints and metrics (`spear train --output`)
    OUTPUT/student/export/    the exported student (model.safetensors + config.json)
    OUTPUT/evaluation/        probe report (index.html, results.json), when there is labelled data

Each step is the job of its own command, so a re-run is incremental: tokenize only
processes new or changed objects, train resumes from its latest checkpoint (and stops at
once when ``train.max_steps`` is reached), and the evaluation already under ``OUTPUT/evaluation``
is reused when it was computed from the same student weights, labelled data, teachers and
probe seeds (:func:`evaluation_provenance`; delete the folder to probe again). Evaluation needs labelled data: a demo corpus
(a ``labels.jsonl`` next to or above the sources) and/or ``evaluate.manifests``; without
either it is skipped (``evaluate`` is null and ``evaluate_skipped`` says why).

Example::

    from spear.config import load_config
    from spear.pipeline.run_job import run_all
    summary = run_all(load_config("spear.yaml"))
    print(summary.to_dict()["train"]["last_loss"])
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from spear.cluster.console import console_log
from spear.cluster.storage import Storage, StorageOptions, join_uri, split_uri
from spear.cluster.ray_runtime import ray_session
from spear.config import SpearConfig
from spear.evaluation.results import EvaluateSummary
from spear.evaluation.tasks import LABELS_FILE, TaskSources, probe_test_uris
from spear.pipeline.evaluate_job import run_evaluate
from spear.pipeline.tokenize_job import run_tokenize
from spear.pipeline.train_job import run_export, run_train
from spear.schemas.student_export import CONFIG_FILE, decode_config

TOKENS_DIR, STUDENT_DIR, EXPORT_DIR, EVALUATION_DIR = "tokens", "student", "export", "evaluation"


@dataclass
class RunSummary:
    """Each step's own summary, nested; ``to_dict()`` is the ``--json`` object."""

    output: str
    tokenize: Any
    train: Any
    export: Any
    evaluate: Any = None
    evaluate_skipped: Optional[str] = None
    wall_seconds: float = 0.0
    # probe test files that the pre-training sources also hold (transductive when > 0; None: not evaluated)
    test_files_in_pretraining: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output,
                "tokenize": self.tokenize.to_dict(), "train": self.train.to_dict(), "export": self.export.to_dict(),
                "evaluate": self.evaluate.to_dict() if self.evaluate is not None else None,
                "evaluate_skipped": self.evaluate_skipped, "wall_seconds": self.wall_seconds,
                "test_files_in_pretraining": self.test_files_in_pretraining}

    def human(self) -> str:
        parts = ["== tokenize", self.tokenize.human(), "== train", self.train.human(), "== export", self.export.human(),
                 "== evaluate", self.evaluate.human() if self.evaluate is not None else f"skipped: {self.evaluate_skipped}",
                 f"done in {self.wall_seconds:.0f} s; output: {self.output}"]
        if self.test_files_in_pretraining:
            parts.insert(-1, f"note: {self.test_files_in_pretraining} probe test files were also in the "
                             "pre-training sources: the probe scores are transductive")
        return "\n".join(parts)


def find_labelled_corpus(cfg: SpearConfig) -> Optional[str]:
    """The demo-corpus root (a folder holding ``labels.jsonl``) at or above the local sources, if any."""
    roots = []
    for src in cfg.corpus.sources:
        scheme, path = split_uri(src.uri)
        if scheme != "file":
            continue
        roots.append(os.path.abspath(path))
    if not roots:
        return None
    common = os.path.commonpath(roots)
    for d in (common, os.path.dirname(common)):
        if os.path.isfile(os.path.join(d, "labels.jsonl")):
            return d
    return None


def evaluation_provenance(cfg: SpearConfig, export: str, corpus_root: Optional[str],
                          storage: Storage) -> dict[str, Any]:
    """What the run's evaluation is computed from, as recorded in its ``results.json``: the student
    export's config (it holds the weights' sha256; the checkpoint's path is left out, so a moved output
    folder still matches), the sha256 of the labelled data (the corpus' ``labels.jsonl``, each
    manifest), the teachers, the probe seeds and whether the teachers' tokens are probed too."""
    student = decode_config(storage.read_text(join_uri(export, CONFIG_FILE)), export)
    student["metadata"] = {k: v for k, v in (student.get("metadata") or {}).items() if k != "checkpoint"}

    def sha256(uri: str) -> str:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()

    return {"student": student,
            "labels_sha256": sha256(join_uri(corpus_root, LABELS_FILE)) if corpus_root else None,
            "manifests": [[m, sha256(m)] for m in cfg.evaluate.manifests],
            # a teacher's memory reservation changes no result: evaluations from before the setting still match
            "teachers": [t.model_dump(mode="json", exclude={"memory_gb"}) for t in cfg.teachers.configured()],
            "seeds": list(cfg.evaluate.seeds), "probe_tokens": cfg.evaluate.probe_tokens,
            # recorded only when on: evaluations from before the setting still match
            **({"combined_teachers": True} if cfg.evaluate.combined_teachers else {})}


def reusable_evaluation(output: str, provenance: dict[str, Any], storage: Storage) -> Optional[EvaluateSummary]:
    """The evaluation under ``output`` when its ``results.json`` records ``provenance`` (and its report is
    there), with its paths set to ``output``; else None (none, unreadable, or computed from other inputs)."""
    try:
        if not storage.exists(join_uri(output, "index.html")):
            return None
        saved = json.loads(storage.read_text(join_uri(output, "results.json")))
        if json.loads(json.dumps(provenance)) != saved.get("provenance"):  # as JSON: tuples are lists there
            return None
        summary = EvaluateSummary.from_dict(saved)
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        return None
    summary.output, summary.report = output, join_uri(output, "index.html")
    summary.results_json = join_uri(output, "results.json")
    return summary


def probe_test_files_in_sources(test_uris: set[str], cfg: SpearConfig) -> int:
    """How many of ``test_uris`` (probe test files) lie under a corpus source: a probe test clip that
    pre-training also saw. Local sources are listed, following symbolic links both ways; an object
    store URI counts when it is under a source's prefix."""
    listed: set[str] = set()
    prefixes: list[str] = []
    for src in cfg.corpus.sources:
        scheme, path = split_uri(src.uri)
        if scheme != "file":
            prefixes.append(src.uri.rstrip("/") + "/")
        elif os.path.isdir(path):
            for dirpath, _, filenames in os.walk(path):
                listed.update(os.path.realpath(os.path.join(dirpath, n)) for n in filenames)
        elif os.path.isfile(path):
            listed.add(os.path.realpath(path))
    return sum(1 for u in test_uris
               if (u.startswith(tuple(prefixes)) if "://" in u else os.path.realpath(u) in listed))


def run_all(cfg: SpearConfig, *, progress: bool = True, corpus_root: Optional[str] = None) -> RunSummary:
    """Tokenize the corpus, train the student on those tokens, export it and evaluate it.

    ``corpus_root``: the labelled demo corpus for the probes (default: one holding
    ``labels.jsonl`` at or above the local sources, :func:`find_labelled_corpus`). The summary
    counts the probe test files that the local sources also hold (``test_files_in_pretraining``):
    more than 0 means pre-training saw test clips, and the log says so.
    """

    t0 = time.monotonic()
    log = console_log(progress)
    storage = Storage(StorageOptions.from_config(cfg.storage))
    tokens = join_uri(cfg.output, TOKENS_DIR)
    student = join_uri(cfg.output, STUDENT_DIR)
    export = join_uri(student, EXPORT_DIR)

    tok_cfg = cfg.model_copy(deep=True)
    tok_cfg.output = tokens
    train_cfg = cfg.model_copy(deep=True)
    train_cfg.output = student
    if train_cfg.train.shards is None:
        train_cfg.train.shards = tokens
    with ray_session(cfg.ray):  # one Ray connection for both jobs
        log(f"[spear run] 1/4 tokenize -> {tokens}")
        tok = run_tokenize(tok_cfg, progress=progress)
        log(f"[spear run] 2/4 train -> {student}")
        tr = run_train(train_cfg, progress=progress)

    log(f"[spear run] 3/4 export -> {export}")
    ex = run_export(student, export, storage)

    ev, skipped, overlap = None, None, None
    corpus_root = corpus_root or find_labelled_corpus(cfg)
    if corpus_root is None and not cfg.evaluate.manifests:
        skipped = "no labelled data: the sources have no labels.jsonl (demo corpus) and evaluate.manifests is empty"
    else:
        out = join_uri(cfg.output, EVALUATION_DIR)
        provenance = evaluation_provenance(cfg, export, corpus_root, storage)
        ev = reusable_evaluation(out, provenance, storage)
        if ev is not None:
            log(f"[spear run] 4/4 evaluate: {out} already holds this student's evaluation on the same labelled "
                "data, teachers and seeds; reusing it (delete the folder to probe again)")
        else:
            log(f"[spear run] 4/4 evaluate -> {out}")
            ev = run_evaluate(export, corpus_root, teachers=cfg.teachers.configured(), output=out,
                              seeds=cfg.evaluate.seeds, manifests=cfg.evaluate.manifests, train_output=student,
                              tokens_output=train_cfg.train.shards, storage=storage, progress=progress,
                              provenance=provenance, probe_tokens=cfg.evaluate.probe_tokens,
                              token_version=cfg.train.token_version,
                              combined_teachers=cfg.evaluate.combined_teachers)
        test_uris = probe_test_uris(TaskSources(corpus_root, tuple(cfg.evaluate.manifests)), storage)
        overlap = probe_test_files_in_sources(test_uris, cfg)
        if overlap:
            log(f"[spear run] note: {overlap} probe test files are also in corpus.sources, so pre-training saw "
                "them (transductive probes); `spear demo` holds them out")
    if skipped:
        log(f"[spear run] evaluate skipped: {skipped}")
    return RunSummary(output=cfg.output, tokenize=tok, train=tr, export=ex, evaluate=ev, evaluate_skipped=skipped,
                      wall_seconds=time.monotonic() - t0, test_files_in_pretraining=overlap)
