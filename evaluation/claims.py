"""What a probe table says about distillation: the checks the demo reports, and the teacher ablation.

Two questions, answered from :func:`spear.evaluation.results.best_layers`' table (each model's
layer chosen on validation; ``score`` and ``ci`` on test):

1. **Did knowledge reach the student?** (:func:`distillation_checks`) On each task where a teacher
   beats the fbank floor by more than the confidence interval, the teacher knows something that
   fbank does not say; the trained student should then beat the random student (same
   architecture, no training) by more than the confidence interval too. A task where no teacher
   clearly beats fbank says nothing about distillation and is listed as such.
2. **Do two teachers beat one?** (:func:`ablation_figures`) The dual-teacher student against
   single-teacher students trained the same way on one teacher's tokens (``train.teacher_roles``),
   on the mean over all tasks and over the mixed speech + audio tasks (:data:`MIXED_TASKS`).

Example::

    >>> best = {"pitch": {"student": {"score": 0.6, "ci": [0.55, 0.65]},
    ...                   "random_student": {"score": 0.4, "ci": [0.35, 0.45]},
    ...                   "teacher:crepe": {"score": 0.9, "ci": [0.85, 0.95]},
    ...                   "fbank": {"score": 0.5, "ci": [0.45, 0.55]}}}
    >>> c = distillation_checks(best)[0]
    >>> c["task"], c["teacher"], c["holds"]
    ('pitch', 'teacher:crepe', True)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

#: The mixed speech + audio tasks of the demo corpus (SPEAR's claim is about covering both domains).
MIXED_TASKS = ("mixed_event", "mixed_speaker", "mixed_has_speech")

#: How the ablation's students are named in a probe table: label -> model name.
ABLATION_STUDENTS = {"dual": "student", "speech-only": "student:speech-only", "audio-only": "student:audio-only"}


def half_width(entry: Mapping[str, Any]) -> float:
    """Half the width of an entry's 95 % interval (0 when it has none).

    >>> half_width({"score": 0.5, "ci": [0.4, 0.6]})
    0.1
    """
    ci = entry.get("ci")
    return round((ci[1] - ci[0]) / 2, 12) if ci else 0.0


def distillation_checks(best: Mapping[str, Mapping[str, Mapping[str, Any]]], *, student: str = "student",
                        baseline: str = "random_student", floor: str = "fbank") -> list[dict[str, Any]]:
    """One row per task: does the best teacher beat ``floor``, and does ``student`` beat ``baseline``,
    each by more than the larger of the two CI half-widths?

    Rows: ``task``, ``teacher`` (the best teacher, or None), ``teacher_score``, ``floor_score``,
    ``teacher_beats_floor`` (by more than the larger CI half-width of the two), ``student_score``, ``baseline_score``,
    ``margin`` (student minus baseline), ``ci`` (the larger half-width), ``student_beats_baseline``
    (margin > ci) and ``holds``: None where no teacher beats the floor (the task says nothing about
    distillation), else ``student_beats_baseline``. ``tokens_score``: the best teacher's tokens
    (``tokens:<kind>``, the teacher decoded from its codebooks: what the student is trained to predict)
    where they were probed, else None. Tasks missing one of the models are left out.
    """
    rows = []
    for task, models in best.items():
        if student not in models or baseline not in models or floor not in models:
            continue
        teachers = {m: e for m, e in models.items() if m.startswith("teacher:")}
        top = max(teachers, key=lambda m: teachers[m]["score"]) if teachers else None
        s, b, f = models[student], models[baseline], models[floor]
        beats_floor = top is not None and teachers[top]["score"] - f["score"] > max(half_width(teachers[top]),
                                                                                     half_width(f))
        margin = s["score"] - b["score"]
        ci = max(half_width(s), half_width(b))
        tokens = models.get("tokens:" + top.split(":", 1)[1]) if top else None
        rows.append({"task": task, "teacher": top, "teacher_score": teachers[top]["score"] if top else None,
                     "tokens_score": tokens["score"] if tokens else None,
                     "floor_score": f["score"], "teacher_beats_floor": beats_floor, "student_score": s["score"],
                     "baseline_score": b["score"], "margin": round(margin, 6), "ci": ci,
                     "student_beats_baseline": margin > ci, "holds": (margin > ci) if beats_floor else None})
    return rows


def _mean(values: Sequence[float]) -> Optional[float]:
    return round(sum(values) / len(values), 6) if values else None


def ablation_figures(best: Mapping[str, Mapping[str, Mapping[str, Any]]], *, measured: str, command: str,
                     students: Mapping[str, str] = ABLATION_STUDENTS,
                     baselines: Sequence[str] = ("random_student", "fbank")) -> dict[str, Any]:
    """The ablation's figures from one probe table: per task each student's (and baseline's) score and
    CI, their means over all tasks and over :data:`MIXED_TASKS`, and which student is best on each.

    ``measured``: when (ISO time); ``command``: what produced them. Only tasks every student was
    probed on count, so the means compare like with like.

    >>> best = {t: {"student": {"score": 0.6, "ci": [0.5, 0.7]}, "student:speech-only": {"score": 0.5},
    ...             "student:audio-only": {"score": 0.4}} for t in ("mixed_event", "word")}
    >>> f = ablation_figures(best, measured="2026-12-01T00:00:00Z", command="spear demo --ablation")
    >>> f["means"]["all"], f["best"]
    ({'dual': 0.6, 'speech-only': 0.5, 'audio-only': 0.4}, {'all': 'dual', 'mixed': 'dual'})
    """
    names = dict(students) | {b: b for b in baselines}
    tasks = [t for t, models in best.items() if all(m in models for m in students.values())]
    per_task = {t: {label: {"score": best[t][m]["score"], "ci": best[t][m].get("ci")}
                    for label, m in names.items() if m in best[t]} for t in tasks}
    means: dict[str, dict[str, Optional[float]]] = {}
    for group, chosen in (("all", tasks), ("mixed", [t for t in tasks if t in MIXED_TASKS])):
        means[group] = {label: _mean([per_task[t][label]["score"] for t in chosen if label in per_task[t]])
                        for label in names if any(label in per_task[t] for t in chosen)}
    winner = {g: max((lbl for lbl in students if m.get(lbl) is not None), key=lambda lbl: m[lbl], default=None)
              for g, m in means.items()}
    return {"measured": measured, "command": command, "students": dict(students), "tasks": per_task,
            "mixed_tasks": [t for t in tasks if t in MIXED_TASKS], "means": means, "best": winner}


def combined_teacher_figures(best: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Optional[dict[str, Any]]:
    """What the teachers know together: the side-by-side row (``teachers:...``, ``combined_teachers``)
    against each teacher alone and fbank, as means over all tasks and over :data:`MIXED_TASKS` (the
    tasks every one of them was probed on), with the gain of the side-by-side row over the best
    single teacher per group. None when no side-by-side row was probed.

    The ceiling of SPEAR's second claim at the teachers' level: a dual-teacher student can gain over
    a single-teacher one only what the second teacher knows that the first does not.

    >>> best = {t: {"teacher:a": {"score": 0.6}, "teacher:b": {"score": 0.4}, "teachers:a+b": {"score": s}}
    ...         for t, s in (("word", 0.7), ("mixed_event", 0.6))}
    >>> f = combined_teacher_figures(best)
    >>> f["combined"], f["means"]["all"]["teachers:a+b"], f["gain"]
    ('teachers:a+b', 0.65, {'all': 0.05, 'mixed': 0.0})
    """
    combined = next((m for models in best.values() for m in models if m.startswith("teachers:")), None)
    if combined is None:
        return None
    singles = list(dict.fromkeys(m for models in best.values() for m in models if m.startswith("teacher:")))
    names = singles + [combined] + (["fbank"] if any("fbank" in v for v in best.values()) else [])
    tasks = [t for t, models in best.items() if all(m in models for m in names)]
    means: dict[str, dict[str, Optional[float]]] = {}
    gain: dict[str, Optional[float]] = {}
    for group, chosen in (("all", tasks), ("mixed", [t for t in tasks if t in MIXED_TASKS])):
        means[group] = {m: _mean([best[t][m]["score"] for t in chosen]) for m in names}
        top = max((means[group][m] for m in singles if means[group][m] is not None), default=None)
        c = means[group][combined]
        gain[group] = None if top is None or c is None else round(c - top, 12)
    return {"combined": combined, "teachers": singles, "tasks": tasks, "means": means, "gain": gain}


# --------------------------------------------------------------------------- post-training

#: The post-training demo's claims: comparison key (:mod:`spear.evaluation.attributes`) -> what it measures.
POSTTRAIN_CLAIMS = {"verification/eer": "speaker verification EER (lower is better)",
                    "retrieval/all/speech_to_speech/R@1": "cross-lingual speech retrieval recall@1",
                    "counting/synthetic/probe": "counting accuracy on held-out synthetic clips"}


def posttrain_checks(comparisons: Mapping[str, Mapping[str, Any]], *, model: str = "posttrained",
                     baselines: Sequence[str] = ("input", "fbank"),
                     claims: Mapping[str, str] = POSTTRAIN_CLAIMS) -> list[dict[str, Any]]:
    """One row per claimed metric: does ``model`` beat every baseline by more than the CI?

    ``comparisons``: the attribute evaluation's ``comparisons`` (metric -> ``values`` system -> [value,
    [lo, hi]], ``better`` [[a, b], ...] where a beats b by more than the larger CI half-width). Rows:
    ``metric``, ``what``, ``model_value``, ``baselines`` (name -> value), ``beats`` (name -> bool) and
    ``holds`` (beats all of them; None when the metric or the model is missing).

    >>> comps = {"verification/eer": {"values": {"posttrained": [0.1, [0.08, 0.12]], "input": [0.4, [0.38, 0.42]],
    ...                                          "fbank": [0.3, [0.2, 0.4]]},
    ...                               "better": [["posttrained", "input"], ["posttrained", "fbank"]]}}
    >>> [(r["metric"], r["holds"]) for r in posttrain_checks(comps)]
    [('verification/eer', True), ('retrieval/all/speech_to_speech/R@1', None), ('counting/synthetic/probe', None)]
    """
    rows = []
    for metric, what in claims.items():
        comp = comparisons.get(metric) or {}
        values = comp.get("values", {})
        better = {tuple(p) for p in comp.get("better", [])}
        present = [b for b in baselines if b in values]
        beats = {b: (model, b) in better for b in present}
        rows.append({"metric": metric, "what": what,
                     "model_value": values[model][0] if model in values else None,
                     "baselines": {b: values[b][0] for b in present}, "beats": beats,
                     "holds": (all(beats.values()) if model in values and present else None)})
    return rows


def with_without(comparisons: Mapping[str, Mapping[str, Any]], best: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 *, with_model: str = "posttrained", without_model: str = "without-counting",
                 with_student: str = "student", without_student: str = "student:without-counting"
                 ) -> list[dict[str, Any]]:
    """The same post-training with and without one ingredient (SpectCount's synthetic counting tasks),
    on every measure both were evaluated on: the attribute metrics (``comparisons``) and the frame-level
    probe tasks (``best``: each probed model's best layer per task).

    Rows: ``measure``, ``with``, ``without``, ``difference`` (with minus without, signed so that
    positive is better for ``with``), ``ci`` (the larger half-width) and ``verdict``: ``with`` /
    ``without`` (better by more than the CI) or ``same``.

    >>> best = {"speaker": {"student": {"score": 0.7, "ci": [0.65, 0.75]},
    ...                     "student:without-counting": {"score": 0.5, "ci": [0.45, 0.55]}}}
    >>> [(r["measure"], r["verdict"]) for r in with_without({}, best)]
    [('probe/speaker', 'with')]
    """
    rows = []

    def row(measure: str, a: Sequence[Any], b: Sequence[Any], higher_is_better: bool) -> None:
        ci = max(half_width({"ci": a[1]}), half_width({"ci": b[1]}))
        diff = (a[0] - b[0]) * (1 if higher_is_better else -1)
        verdict = "with" if diff > ci else "without" if -diff > ci else "same"
        rows.append({"measure": measure, "with": a[0], "without": b[0], "difference": round(diff, 6),
                     "ci": ci, "higher_is_better": higher_is_better, "verdict": verdict})

    for metric, comp in comparisons.items():
        values = comp.get("values", {})
        if with_model in values and without_model in values:
            row(metric, values[with_model], values[without_model], bool(comp.get("higher_is_better", True)))
    for task, models in best.items():
        if with_student in models and without_student in models:
            a, b = models[with_student], models[without_student]
            row(f"probe/{task}", (a["score"], a.get("ci")), (b["score"], b.get("ci")), True)
    return rows
