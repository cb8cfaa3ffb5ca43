"""The evaluation job (`spear evaluate`): linear probes on frozen features, with a report.

The job composes :mod:`spear.evaluation`: the tasks (:mod:`~spear.evaluation.tasks`, from a
demo corpus and user manifests) name clips, decoded once (:mod:`~spear.evaluation.clips`);
every model's features (:mod:`~spear.evaluation.features`: the student's layers, a random
student, the teachers, with ``probe_tokens`` the teachers as the token set's codebooks render them,
raw fbank) are extracted once per clip, then a linear probe
(:mod:`~spear.evaluation.probes`) is fitted per (task, model, layer)
(:mod:`~spear.evaluation.results`); the report (:mod:`~spear.evaluation.report`) shows them.

Utterance tasks mean-pool each layer over the clip's frames; frame tasks take the frame
under each 0.25 s grid point, and their validation carve and bootstrap work on whole clips.
The score is test accuracy, the mean over ``seeds``; ``ci`` is a 95 % bootstrap interval over
test items.

Output (``output``: a local path or s3:// prefix): ``index.html`` with PNG plots next to it
and ``results.json`` (= :meth:`EvaluateSummary.to_dict`).

A post-trained export (``spear posttrain``) as the student adds the utterance-level attribute
evaluation (:mod:`spear.pipeline.posttrain_eval`: speaker verification, cross-lingual retrieval,
counting; ``summary.attributes``) and probes the input model beside the post-trained encoder.

Example::

    from spear.config import TeacherConfig
    from spear.pipeline.evaluate_job import run_evaluate
    summary = run_evaluate("runs/student", "spear-demo/corpus", output="runs/eval",
                           teachers=[TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank")])
    print(summary.best["word"]["student"], summary.report)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from spear.cluster.console import console_log
from spear.cluster.storage import Storage, join_uri
from spear.config import TeacherConfig
from spear.evaluation.clips import corpus_summary, decode_clips
from spear.evaluation.features import (Features, ProbedModels, TokenTarget, combine_features, combined_teachers_name,
                                      extract, extractor_loaders)
from spear.evaluation.probes import L2_GRID
from spear.evaluation.report import write_report
from spear.evaluation.results import EvaluateSummary, best_layers, probe_model
from spear.evaluation.tasks import Task, TaskSources, frame_grid, label_counts, load_tasks, skip_reason
from spear.models.device import default_device, torch_threads
from spear.pipeline.ledger import select_token_store
from spear.pipeline.posttrain_eval import (AttributeEvalSettings, evaluate_posttrained, input_model_of,
                                           posttrained_config, with_input_model)
from spear.schemas.shards import TEACHER_ROLES


@dataclass(frozen=True)
class EvaluateSettings:
    """One evaluation: what to probe on, which models, the probe's seeds and L2 grid, where
    the report goes and what else it shows.

    ``batch_seconds``: padded audio per feature-extraction batch. ``train_output`` /
    ``tokens_output``: a training output (loss curves) and a tokenize output (codebook usage)
    for the report.
    """

    output: str
    tasks: TaskSources
    models: ProbedModels
    seeds: tuple[int, ...] = (0, 1, 2)
    l2_grid: tuple[float, ...] = L2_GRID
    train_output: Optional[str] = None
    tokens_output: Optional[str] = None
    batch_seconds: float = 60.0
    attributes: AttributeEvalSettings = AttributeEvalSettings()
    provenance: Mapping[str, Any] = field(default_factory=dict)  # recorded in results.json (EvaluateSummary)


def run_evaluate(student_dir: Optional[str], corpus_root: Optional[str], *, teachers: Sequence[Any] = (),
                 output: str, seeds: Sequence[int] = (0, 1, 2), manifests: Sequence[str] = (),
                 layers: Union[str, Sequence[int]] = "all", random_student: Union[bool, Mapping[str, Any]] = True,
                 fbank_floor: bool = True, tasks: Optional[Sequence[str]] = None,
                 l2_grid: Optional[Sequence[float]] = None, train_output: Optional[str] = None,
                 tokens_output: Optional[str] = None, storage: Optional[Storage] = None,
                 device: Optional[Union[str, torch.device]] = None, batch_seconds: float = 60.0,
                 num_threads: Optional[int] = None, progress: bool = True,
                 released: Sequence[str] = (), other_students: Sequence[tuple[str, str]] = (),
                 eval_table: Optional[str] = None, eval_manifests: Sequence[str] = (),
                 input_model: Optional[str] = None, counting_per_class: int = 12,
                 attribute_bootstrap: int = 1000, text_encoder: Optional[str] = None,
                 provenance: Optional[Mapping[str, Any]] = None, probe_tokens: bool = False,
                 token_version: Optional[str] = None, combined_teachers: bool = False) -> EvaluateSummary:
    """Probe frozen features of a student, a random student, teachers and raw fbank; write a report.

    ``student_dir``: an exported student (None: no ``student`` rows). ``corpus_root``: a
    demo corpus (a folder with ``labels.jsonl``; None: manifests only). ``teachers``:
    TeacherConfigs (or mappings of their fields). ``manifests``: CSV/JSONL task files (see
    :func:`spear.evaluation.tasks.load_manifest_task`). ``layers``: "all", "last" or 1-based
    layer numbers of the students. ``random_student``: True for the student's own architecture
    (needs ``student_dir``), a mapping such as ``{"architecture": "zipformer2", "size": "tiny"}``
    to choose one, or False. ``tasks``: restrict to these task names. ``l2_grid``: the
    probe's L2 grid (default :data:`spear.evaluation.probes.L2_GRID`). ``train_output`` /
    ``tokens_output``: a training output (loss curves) and a tokenize output (codebook usage)
    for the report. Features run on CUDA when present (students under bf16 autocast).
    ``num_threads``: torch CPU threads during the run (restored afterwards; None: leave as
    is). On a busy machine with few cores, 1 is often fastest: measured here (2 cores, load
    ~8), the tiny student ran 10x faster on one thread than on two. ``released``: released SPEAR
    models (the authors' icefall ``.pt`` or transformers-style folder, or other spear exports),
    probed layer by layer beside the student as ``released:<name>``. ``other_students``: (label,
    export dir) pairs of further trained students, probed as ``student:<label>`` (post-trained exports
    among them also join the attribute evaluation, as ``<label>``).

    With a post-trained export as ``student_dir``: ``eval_table`` (a prepared ``eval.parquet``) or
    ``eval_manifests`` (held-out manifests) for verification and retrieval (default: the table
    ``spear posttrain`` prepared next to the export), ``input_model`` (default: the export's metadata),
    ``counting_per_class`` held-out synthetic clips per count, ``attribute_bootstrap`` resamples,
    ``text_encoder`` the sentence encoder of the semantic targets when one was used
    (:mod:`spear.pipeline.posttrain_eval`).

    ``probe_tokens``: also probe each teacher of the token set at ``tokens_output`` (its
    ``token_version``, or the only one there) as its codebooks render it: the teacher's embeddings
    encoded and decoded back, rows ``tokens:<kind>`` (:func:`token_targets`). What the student is
    asked to predict: far below the teacher, the codebooks lost knowledge; far above the student,
    training has not reached it.

    ``combined_teachers``: with two teachers or more, also probe their embeddings side by side, one row
    ``teachers:<kind>+<kind>`` after the last teacher: what a student distilled from all of them could
    know at most (a dual-teacher student's ceiling), against each teacher alone.

    ``provenance``: what the caller says these results are computed from, recorded as they are in
    ``results.json`` (`spear run` re-uses an evaluation whose provenance matches its own).

    Returns an :class:`EvaluateSummary`; writes ``output/index.html``, its PNG plots and
    ``output/results.json``.
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("run_evaluate needs at least one probe seed")
    storage = storage or Storage()
    targets: list[TokenTarget] = []
    if probe_tokens:
        if tokens_output is None:
            raise ValueError("probe_tokens needs tokens_output (the `spear tokenize` output the student trained on)")
        targets = token_targets(tokens_output, storage, token_version)
    settings = EvaluateSettings(
        output=str(output), tasks=TaskSources(corpus_root, tuple(manifests), tasks),
        models=ProbedModels(student_dir, random_student, tuple(teachers), fbank_floor, layers,
                            released=tuple(str(r) for r in released),
                            other_students=tuple((str(n), str(p)) for n, p in other_students),
                            token_targets=tuple(targets), combined_teachers=combined_teachers), seeds=seeds,
        l2_grid=tuple(l2_grid) if l2_grid is not None else L2_GRID, train_output=train_output,
        tokens_output=tokens_output, batch_seconds=batch_seconds,
        attributes=AttributeEvalSettings(eval_table, tuple(str(m) for m in eval_manifests), input_model,
                                         int(counting_per_class), int(attribute_bootstrap), text_encoder),
        provenance=dict(provenance or {}))
    log = console_log(progress)
    device = torch.device(device) if device is not None else default_device()
    with torch_threads(num_threads):
        return evaluate(settings, storage, device, log)


def token_targets(tokens_output: str, storage: Storage, version: Optional[str] = None) -> list[TokenTarget]:
    """Each teacher role of a token set (its ``version``, or the only one) with its teacher's recorded
    config and its codebooks: what ``probe_tokens`` probes as ``tokens:<kind>``."""
    info = select_token_store(tokens_output, storage, version).version_info()
    recorded = info.get("teachers") or {}
    return [TokenTarget(role, TeacherConfig.model_validate(recorded[role]["config"]), recorded[role]["uri"])
            for role in TEACHER_ROLES if isinstance(recorded.get(role), dict)]


def evaluate(settings: EvaluateSettings, storage: Storage, device: torch.device,
             log: Callable[[str], None] = lambda msg: None) -> EvaluateSummary:
    """:func:`run_evaluate` from its settings: tasks -> clips -> per model, features -> probes -> report."""
    t_start = time.monotonic()
    tasks, items = load_tasks(settings.tasks, storage)
    needed = sorted({i for t in tasks for i in t.items})
    log(f"[evaluate] {len(tasks)} tasks over {len(needed)} files; decoding")
    clips, skipped_files = decode_clips({i: items.uris[i] for i in needed}, storage)
    tasks = [t.keep(lambda i: i in clips) for t in tasks]
    grids = {i: frame_grid(clips[i].seconds) for t in tasks if t.level == "frame" for i in t.items}
    task_info, runnable, skipped_tasks = _probeable(tasks, grids, log)

    # A post-trained export: its input model is probed beside it (frame-level probes before / after).
    models, posttrained = settings.models, posttrained_config(settings.models.student_dir, storage)
    if posttrained is not None:
        input_model = input_model_of(posttrained, settings.attributes.input_model)
        models, before, note = with_input_model(models, input_model, storage)
        log(f"[evaluate] {models.student_dir} is a post-trained export"
            + (f"; input model probed as {before}" if before else f" ({note})"))

    # Models, loaded one at a time (only one model's features are in memory at once, but for the teachers'
    # with combined_teachers: kept until the last teacher's are extracted, for their side-by-side row).
    probe_rows: list[dict[str, Any]] = []
    model_info: list[dict[str, Any]] = []
    num_teachers = len(models.teacher_configs())
    combine = models.combined_teachers and num_teachers > 1
    teacher_feats: list[tuple[str, Features]] = []  # kept for their side-by-side row (combined_teachers)
    for name, load in extractor_loaders(models, storage, device):
        t0 = time.monotonic()
        ex = load()
        feats = extract(ex, clips, grids, len(items.uris), device, settings.batch_seconds, log)
        ex.fn = None  # release the model
        t1 = time.monotonic()
        probe_rows += probe_model(name, feats, ex.layers, runnable, grids, seeds=settings.seeds,
                                  l2_grid=settings.l2_grid)
        t2 = time.monotonic()
        dims = [int(p.shape[1]) for p in feats.pooled]
        if combine and ex.kind == "teacher":
            teacher_feats.append((name, feats))
        del feats
        # the extractor's own details first: a key of theirs never replaces what the row says of the model
        model_info.append({**ex.info, "name": name, "kind": ex.kind, "frame_rate": ex.frame_rate, "layers": ex.layers,
                           "dims": dims, "extract_seconds": round(t1 - t0, 3), "probe_seconds": round(t2 - t1, 3)})
        log(f"[evaluate] {name}: features {t1 - t0:.1f} s, {len(runnable)} tasks x {len(ex.layers)} layer(s) "
            f"probed in {t2 - t1:.1f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if combine and len(teacher_feats) == num_teachers:
            t1 = time.monotonic()
            names = [n for n, _ in teacher_feats]
            both = combine_features([f for _, f in teacher_feats])
            teacher_feats.clear()
            combined = combined_teachers_name(names)
            probe_rows += probe_model(combined, both, [None], runnable, grids, seeds=settings.seeds,
                                      l2_grid=settings.l2_grid)
            t2 = time.monotonic()
            model_info.append({"name": combined, "kind": "teachers_combined", "teachers": names, "frame_rate": None,
                               "layers": [None],
                               "dims": [int(both.pooled[0].shape[1])], "extract_seconds": 0.0,
                               "probe_seconds": round(t2 - t1, 3)})
            log(f"[evaluate] {combined}: the {len(names)} teachers side by side, {len(runnable)} tasks probed in "
                f"{t2 - t1:.1f} s")
            del both

    attributes: dict[str, Any] = {}
    if posttrained is not None:
        attributes = evaluate_posttrained(
            str(models.student_dir), posttrained, settings.attributes, input_model=input_model,
            corpus_root=settings.tasks.corpus_root, storage=storage, device=device, probe_seeds=settings.seeds,
            l2_grid=settings.l2_grid, batch_seconds=settings.batch_seconds,
            others=[(label, path) for label, path in models.other_students
                    if posttrained_config(path, storage) is not None], log=log)
        attributes["frame_probes"] = {"before": before, "after": "student"} if before else None
        if note:
            attributes["notes"].append(note)

    output = settings.output
    summary = EvaluateSummary(
        output=output, report=join_uri(output, "index.html"), results_json=join_uri(output, "results.json"),
        probes=probe_rows, best=best_layers(probe_rows), tasks=task_info, models=model_info,
        corpus=corpus_summary(clips, items.domains), seeds=list(settings.seeds), skipped_tasks=skipped_tasks,
        skipped_files=skipped_files, attributes=attributes, provenance=dict(settings.provenance))
    summary.wall_seconds = round(time.monotonic() - t_start, 3)
    write_report(summary, output, storage=storage, train_output=settings.train_output,
                 tokens_output=settings.tokens_output)
    log(f"[evaluate] report: {summary.report}")
    return summary


def _probeable(tasks: list[Task], grids: dict[int, np.ndarray], log: Callable[[str], None]
               ) -> tuple[list[dict[str, Any]], list[Task], list[dict[str, str]]]:
    """(a summary row per task, the tasks a probe can run on, {"task", "reason"} of the others)."""
    task_info, runnable, skipped = [], [], []
    for t in tasks:
        counts = label_counts(t, grids)
        reason = skip_reason(t, counts)
        task_info.append({"name": t.name, "level": t.level, "source": t.source, "description": t.description,
                          "files": len(t.items), "class_counts": counts, "skipped": reason})
        if reason:
            skipped.append({"task": t.name, "reason": reason})
            log(f"[evaluate] skipping task {t.name}: {reason}")
        else:
            runnable.append(t)
    return task_info, runnable, skipped
