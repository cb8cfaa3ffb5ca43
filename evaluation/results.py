"""Probe results: one row per (task, model, layer), the best layer of each model, the summary.

:func:`probe_model` fits the linear probe (:func:`spear.evaluation.probes.run_probe`) on every
task and kept layer of one model's features; :class:`EvaluateSummary` gathers the rows with
what was probed, and is what ``results.json`` and ``spear evaluate --json`` hold.

Example::

    from spear.evaluation.results import best_layers, probe_model

    rows = probe_model("fbank", feats, [None], tasks, grids, seeds=(0, 1, 2))
    best_layers(rows)["speaker"]["fbank"]  # {"layer": None, "score": ..., "ci": [lo, hi]}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from spear.evaluation.features import Features
from spear.evaluation.probes import L2_GRID, run_probe
from spear.evaluation.report import format_results_table
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


def best_layers(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {model: {"layer", "score", "ci"}}}``: each model's highest-scoring layer per task
    (the first one on a tie)."""
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cur = best.setdefault(r["task"], {}).get(r["model"])
        if cur is None or r["score"] > cur["score"]:
            best[r["task"]][r["model"]] = {"layer": r["layer"], "score": r["score"], "ci": r["ci"]}
    return best


@dataclass
class EvaluateSummary:
    """What `spear evaluate` did; ``to_dict()`` is the ``--json`` object and ``results.json``.

    ``probes``: one row per (task, model, layer): task, model, layer (1-based for students,
    None for teachers and fbank), score (mean test accuracy over seeds), metric, ci ([lo, hi],
    95 % bootstrap over test items), ci_method, macro_f1, seed_scores, l2 (chosen per seed),
    num_train, num_test, num_classes, chance, level.
    ``best``: ``{task: {model: {"layer", "score", "ci"}}}`` (the best layer of each model).
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
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        lines = [format_results_table(self), "", f"report: {self.report}", f"results: {self.results_json}"]
        if self.skipped_tasks:
            lines.append("skipped tasks: " + "; ".join(f"{s['task']} ({s['reason']})" for s in self.skipped_tasks))
        if self.skipped_files:
            lines.append(f"skipped {len(self.skipped_files)} unreadable file(s): "
                         + ", ".join(s["uri"] for s in self.skipped_files[:5]))
        return "\n".join(lines)
