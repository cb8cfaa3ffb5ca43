"""Probe results: one row per (task, model, layer), each model's layer chosen on validation, the summary.

:func:`probe_model` fits the linear probe (:func:`spear.evaluation.probes.run_probe`) on every
task and kept layer of one model's features; :class:`EvaluateSummary` gathers the rows with
what was probed, and is what ``results.json`` and ``spear evaluate --json`` hold.

Example::

    from spear.evaluation.results import best_layers, probe_model

    rows = probe_model("fbank", feats, [None], tasks, grids, seeds=(0, 1, 2))
    best_layers(rows)["speaker"]["fbank"]  # {"layer": None, "score": ..., "ci": [lo, hi], "val_score": ..., "l2": [...]}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from spear.evaluation.features import Features
from spear.evaluation.probes import L2_GRID, run_probe
from spear.evaluation.report import format_attributes_table, format_results_table
from spear.evaluation.tasks import Task, task_arrays


def probe_model(model: str, feats: Features, layers: Sequence[Optional[int]], tasks: Sequence[Task],
                grids: dict[int, np.ndarray], *, seeds: Sequence[int],
                l2_grid: Sequence[float] = L2_GRID) -> list[dict[str, Any]]:
    """One result row per task and layer of ``model`` (``layers[k]`` names ``feats``' k-th layer):
    task, model, layer, level and the :class:`~spear.evaluation.probes.ProbeResult` fields."""
    rows = []
    for t in tasks:
        for li, layer in enumerate(layers):
            xtr, ytr, xte, yte, gtr, gte = task_arrays(t, feats.pooled[li], feats.frames[li], grids)
            res = run_probe(xtr, ytr, xte, yte, seeds=seeds, l2_grid=l2_grid, groups_train=gtr, groups_test=gte)
            rows.append({"task": t.name, "model": model, "layer": layer, "level": t.level, **res.to_dict()})
    return rows


def _validation_key(row: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: mean validation accuracy, then lower mean validation cross-entropy;
    a row without validation (no carve was possible) ranks below every row with one."""
    acc, ce = row.get("val_score"), row.get("val_loss")
    return (-np.inf if acc is None else float(acc), -np.inf if ce is None else -float(ce))


def best_layers(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {model: {"layer", "score", "ci", "val_score", "l2"}}}``: per task, each model's layer
    chosen on validation, never on test scores.

    A model's layer is the one with the highest mean validation accuracy (``val_score``: each
    seed's validation carve of the probe's training split, at the L2 that carve chose), ties
    broken by the lower validation cross-entropy, then by the first layer. ``score`` and ``ci``
    are that layer's test accuracy and interval as probed (at the validation-chosen L2 of each
    seed, ``l2``): the test set chooses nothing, so a many-layer student and a one-layer
    baseline are measured the same way.

    >>> rows = [{"task": "t", "model": "m", "layer": 1, "score": 0.9, "ci": [0.8, 1.0], "val_score": 0.6,
    ...          "val_loss": 0.9, "l2": [0.1]},
    ...         {"task": "t", "model": "m", "layer": 2, "score": 0.7, "ci": [0.6, 0.8], "val_score": 0.8,
    ...          "val_loss": 0.5, "l2": [0.01]}]
    >>> best_layers(rows)["t"]["m"]["layer"], best_layers(rows)["t"]["m"]["score"]
    (2, 0.7)
    """
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cur = chosen.setdefault(r["task"], {}).get(r["model"])
        if cur is None or _validation_key(r) > _validation_key(cur):
            chosen[r["task"]][r["model"]] = r
    return {t: {m: {"layer": r["layer"], "score": r["score"], "ci": r["ci"], "val_score": r.get("val_score"),
                    "l2": r.get("l2")} for m, r in by_model.items()} for t, by_model in chosen.items()}


@dataclass
class EvaluateSummary:
    """What `spear evaluate` did; ``to_dict()`` is the ``--json`` object and ``results.json``.

    ``probes``: one row per (task, model, layer): task, model, layer (1-based for students,
    None for teachers and fbank), score (mean test accuracy over seeds), metric, ci ([lo, hi],
    95 % bootstrap over test items), ci_method, macro_f1, seed_scores, l2 (chosen per seed),
    num_train, num_test, num_classes, chance, level, val_seed_scores, val_seed_losses, val_score
    and val_loss (validation accuracy / cross-entropy on each seed's carve of the training split).
    ``best``: ``{task: {model: {"layer", "score", "ci", "val_score", "l2"}}}``: each model's layer
    chosen by validation accuracy (:func:`best_layers`), reported with its test score.
    """

    output: str
    report: str
    results_json: str
    probes: list[dict[str, Any]]
    best: dict[str, dict[str, dict[str, Any]]]
    tasks: list[dict[str, Any]]
    models: list[dict[str, Any]]
    corpus: dict[str, Any]
    seeds: list[int]
    skipped_tasks: list[dict[str, str]] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # report sections: training curves, codebooks
    # utterance-level attributes of a post-trained model (spear.evaluation.attributes.evaluate_attributes)
    attributes: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    # What the caller says the results were computed from (`spear run`: the student export, the labelled
    # data, the teachers, the probe seeds); a later run with the same provenance reuses them. Empty: not given.
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvaluateSummary":
        """The summary back from :meth:`to_dict` (a ``results.json``); keys it does not know are ignored.

        Raises TypeError when a field without a default is missing.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def human(self) -> str:
        lines = [format_results_table(self), "", f"report: {self.report}", f"results: {self.results_json}"]
        if self.skipped_tasks:
            lines.append("skipped tasks: " + "; ".join(f"{s['task']} ({s['reason']})" for s in self.skipped_tasks))
        if self.attributes:
            lines[1:1] = ["", format_attributes_table(self.attributes)]
        if self.skipped_files:
            lines.append(f"skipped {len(self.skipped_files)} unreadable file(s): "
                         + ", ".join(s["uri"] for s in self.skipped_files[:5]))
        return "\n".join(lines)
