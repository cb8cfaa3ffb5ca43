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
    distillation), else ``student_beats_baseline``. Tasks missing one of the models are left out.
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
        rows.append({"task": task, "teacher": top, "teacher_score": teachers[top]["score"] if top else None,
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
