"""`spear demo --posttrain`: post-train the demo's student into utterance-level embeddings and show
what it gained.

generate the multilingual corpus (espeak-ng: parallel sentences in four languages, synthetic speakers,
:mod:`spear.synthetic.multilingual`; cached) -> `spear posttrain` the demo's first-iteration student
twice with the demo config's ``posttrain`` section: once as configured (speaker, meaning and the
synthetic counting tasks) and once the same without the counting attributes (SpectCount's
comparison) -> `spear evaluate` the post-trained model with the other one beside it: speaker
verification on held-out speakers, cross-lingual retrieval, counting, and the frame-level probes of
the demo corpus before (the input student) and after -> the claims
(:func:`spear.evaluation.report.posttrain_claims`: :func:`spear.evaluation.claims.posttrain_checks` and
:func:`~spear.evaluation.claims.with_without`) printed and in the report.

Layout under ``workdir``::

    posttrain/corpus/               the multilingual corpus (train.jsonl, eval.jsonl, audio/)
    posttrain/with-counting/        `spear posttrain` output (posttrain/model is the export)
    posttrain/without-counting/     the same without the counting attributes
    posttrain/evaluation/           the report (index.html) and results.json
    posttrain/posttrain_demo.json   the summary (the tables below)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from spear.cluster.console import console_log
from spear.cluster.storage import Storage, StorageOptions, join_uri
from spear.config import ConfigError, SpearConfig
from spear.evaluation.report import posttrain_claims
from spear.pipeline.evaluate_job import run_evaluate
from spear.pipeline.posttrain_job import MODEL_DIR, POSTTRAIN_DIR, run_posttrain
from spear.synthetic.multilingual import generate_multilingual_corpus

DEMO_POSTTRAIN_DIR = "posttrain"
WITH, WITHOUT = "with-counting", "without-counting"
SUMMARY_FILE = "posttrain_demo.json"
#: The probe tasks of the demo corpus whose before / after the post-training demo shows: the clips of
#: one domain each (31 of the corpus's 54 minutes; the mixtures would add 19 minutes per model probed).
FRAME_PROBE_TASKS = ("speaker", "word", "event", "event_count", "pitch")


@dataclass
class PostTrainDemoSummary:
    """What `spear demo --posttrain` measured; ``to_dict()`` is its part of the ``--json`` object."""

    workdir: str
    corpus: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    report: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    with_without: list[dict[str, Any]] = field(default_factory=list)
    comparisons: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        c = self.corpus
        out = [f"== post-training ({c['utterances']['train']} training and {c['utterances']['eval']} held-out "
               f"utterances, {len(c['languages'])} languages, {len(c['speakers']['train'])} training and "
               f"{len(c['speakers']['eval'])} held-out speakers) in {self.wall_seconds / 60:.1f} min"]
        out += [format_comparison_table(self.comparisons, ("posttrained", WITHOUT, "input", "fbank"))]
        out.append("== did post-training give better utterance embeddings than its input and fbank?")
        for r in self.checks:
            base = ", ".join(f"{b} {v:.3f}" for b, v in r["baselines"].items())
            verdict = "no measure" if r["holds"] is None else "holds" if r["holds"] else "does NOT hold"
            mv = "-" if r["model_value"] is None else f"{r['model_value']:.3f}"
            out.append(f"{r['what']:<48} post-trained {mv} vs {base}: {verdict}")
        if self.with_without:
            wins = {v: sum(1 for r in self.with_without if r["verdict"] == v) for v in ("with", "without", "same")}
            out.append(f"== with vs without the synthetic counting tasks ({len(self.with_without)} measures): "
                       f"better with {wins['with']}, better without {wins['without']}, same within CI {wins['same']}")
            for r in self.with_without:
                if r["verdict"] != "same":
                    out.append(f"  {r['measure']:<44} with {r['with']:.3f} without {r['without']:.3f}: "
                               f"{r['verdict']} counting is better (CI {r['ci']:.3f})")
        out.append(f"report: {self.report}")
        return "\n".join(out)


def format_comparison_table(comparisons: dict[str, Any], systems: tuple[str, ...]) -> str:
    """Metric x system, each value with its 95 % interval."""
    shown = [s for s in systems if any(s in c.get("values", {}) for c in comparisons.values())]
    lines = [f"{'metric':<44}" + "".join(f"{s:>24}" for s in shown)]
    for metric, comp in comparisons.items():
        cells = []
        for s in shown:
            v = comp.get("values", {}).get(s)
            cells.append(f"{v[0]:.3f} [{v[1][0]:.3f}, {v[1][1]:.3f}]" if v else "-")
        lines.append(f"{metric:<44}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def without_counting(cfg: SpearConfig) -> SpearConfig:
    """``cfg`` with its counting attributes removed (the rest unchanged: same data, steps and seed)."""
    kept = [a for a in cfg.posttrain.attributes if a.kind != "counting"]
    if len(kept) == len(cfg.posttrain.attributes):
        raise ConfigError("posttrain.attributes has no counting attribute: the demo compares post-training with "
                          "and without the synthetic counting tasks")
    if not kept:
        raise ConfigError("posttrain.attributes has only counting attributes: nothing is left without them")
    out = cfg.model_copy(deep=True)
    out.posttrain.attributes = kept
    return out


def run_demo_posttrain(cfg: SpearConfig, *, workdir: str, input_model: str, corpus_root: str, size: str = "demo",
                       progress: bool = True) -> PostTrainDemoSummary:
    """Post-train ``input_model`` (the demo's student export) with and without the counting tasks on the
    multilingual corpus, evaluate both beside the input model and fbank, and check the claims."""
    t0 = time.monotonic()
    log = console_log(progress)
    root = os.path.join(os.path.abspath(workdir), DEMO_POSTTRAIN_DIR)
    corpus = generate_multilingual_corpus(os.path.join(root, "corpus"), size="tiny" if size == "tiny" else "demo",
                                          seed=0, progress=lambda line: log(f"[corpus] {line}"))
    base = cfg.model_copy(deep=True)
    base.posttrain.model = input_model
    base.posttrain.train_manifests = [str(corpus.train_manifest)]
    base.posttrain.eval_manifests = [str(corpus.eval_manifest)]
    runs: dict[str, dict[str, Any]] = {}
    exports: dict[str, str] = {}
    for label, variant in ((WITH, base), (WITHOUT, without_counting(base))):
        variant.output = os.path.join(root, label)
        log(f"[demo] post-training {label}: attributes "
            + ", ".join(f"{a.name} ({a.kind})" for a in variant.posttrain.attributes) + f" -> {variant.output}")
        summary = run_posttrain(variant, progress=progress)
        runs[label] = summary.to_dict()
        exports[label] = join_uri(variant.output, POSTTRAIN_DIR, MODEL_DIR)
    out = os.path.join(root, "evaluation")
    log(f"[demo] evaluating the post-trained models beside the input student and fbank -> {out}")
    ev = run_evaluate(exports[WITH], corpus_root, teachers=(), output=out, seeds=cfg.evaluate.seeds,
                      random_student=False, tasks=list(FRAME_PROBE_TASKS), other_students=[(WITHOUT, exports[WITHOUT])],
                      storage=Storage(StorageOptions.from_config(cfg.storage)), progress=progress)
    comparisons = (ev.attributes or {}).get("comparisons", {})
    claims = posttrain_claims(ev.attributes or {}, ev.best)
    summary = PostTrainDemoSummary(
        workdir=os.path.abspath(workdir),
        corpus={"root": str(corpus.root), "utterances": corpus.utterances, "total_seconds": corpus.total_seconds,
                "languages": corpus.languages, "speakers": corpus.speakers},
        runs=runs, report=ev.report, checks=claims["checks"], with_without=claims["with_without"].get(WITHOUT, []),
        comparisons=comparisons, wall_seconds=time.monotonic() - t0)
    with open(os.path.join(root, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary.to_dict(), f, indent=1)
    return summary

