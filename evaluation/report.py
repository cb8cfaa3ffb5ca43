"""The evaluation report: a self-contained folder with ``index.html``, PNG plots and ``results.json``.

Layout under the report folder (local path or s3:// prefix; every link is relative, so the
folder can be copied or served as is)::

    index.html                  overview table, one plot per task, training curves,
                                codebook usage, corpus summary, models and timings
    results.json                the evaluation summary (EvaluateSummary.to_dict())
    overview.png                best score per task and model (heatmap)
    task_<task>.png             score per layer: student and random_student as lines with
                                95 % CI bands, teachers and fbank as horizontal lines with
                                bands, chance as a dotted line
    train_loss_curve.png        copied from TRAIN_OUTPUT/metrics/loss_curve.png (or drawn
                                from metrics.csv), when a training output is given
    codebook_<name>.png         copied from TOKENS/codebooks/<name>/usage.png, when a
                                tokenize output is given (layout: :mod:`spear.schemas.shards`)
    attributes_det.png          a post-trained model's utterance-level attributes
    attributes_retrieval.png    (:mod:`spear.evaluation.attributes`): DET curves of every
    attributes_bars.png         system, the language x language retrieval matrix, and
                                each metric per system with its CI

:func:`format_results_table` renders the same results as plain text for the CLI.

Example::

    from spear.evaluation.report import format_results_table, write_report
    write_report(summary, "runs/eval", train_output="runs/train", tokens_output="runs/tokens")
    print(format_results_table(summary))
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import posixpath
import re
import tempfile
import time
from typing import Any, Mapping, Optional

from spear.cluster.storage import Storage, join_uri
from spear.evaluation.claims import combined_teacher_figures, distillation_checks, posttrain_checks, with_without
from spear.schemas.codebooks import META_NAME as CODEBOOK_META_FILE
from spear.schemas.train_metrics import METRICS_FILE, learned_losses

# Where the producers keep what the report copies: the training job writes its metrics under
# TRAIN_OUTPUT/metrics/, tokenize one folder per codebook artefact (layout: spear.schemas.shards;
# the artefact's own files: spear.schemas.codebooks).
TRAIN_METRICS_DIR = "metrics"
LOSS_CURVE_FILE = "loss_curve.png"
CODEBOOKS_DIR = "codebooks"
USAGE_PLOT_FILE = "usage.png"

# Fixed colours so a model looks the same in every plot.
_COLORS = {"student": "#1f77b4", "random_student": "#7f7f7f", "fbank": "#d62728"}
_ABLATION_COLORS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f"]  # dual, speech-only, audio-only, random
_TEACHER_COLORS = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _as_dict(summary: Any) -> dict[str, Any]:
    return summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _model_order(models: list[str]) -> list[str]:
    rank = {"student": 0, "random_student": 1, "fbank": 3}
    return sorted(models, key=lambda m: (rank.get(m, 2), models.index(m)))


def _model_color(model: str, models: list[str]) -> str:
    if model in _COLORS:
        return _COLORS[model]
    teachers = [m for m in models if m not in _COLORS]
    return _TEACHER_COLORS[teachers.index(model) % len(_TEACHER_COLORS)] if model in teachers else "#000000"


def _layer_label(layer: Any) -> str:
    return "" if layer is None else f"L{layer}"


# --------------------------------------------------------------------------- text


def format_results_table(summary: Any) -> str:
    """Plain-text table: one row per task, one column per model; each cell is the test score ± half
    the 95 % CI width of the layer chosen on validation, with that layer (``@L3``) for layered models.

    Example output::

        task             student        random_student  teacher:mfcc  fbank
        speaker          0.917±0.083@L4 0.750±0.125@L2  0.833±0.104   0.667±0.146
    """
    d = _as_dict(summary)
    best = d.get("best", {})
    tasks = [t["name"] for t in d.get("tasks", []) if t["name"] in best] or list(best)
    models = _model_order(list(dict.fromkeys(r["model"] for r in d.get("probes", []))))
    header = ["task"] + models
    rows = [header]
    for t in tasks:
        row = [t]
        for m in models:
            b = best.get(t, {}).get(m)
            if b is None:
                row.append("-")
                continue
            half = (b["ci"][1] - b["ci"][0]) / 2 if b.get("ci") else 0.0
            layer = f"@{_layer_label(b['layer'])}" if b["layer"] is not None else ""
            row.append(f"{b['score']:.3f}±{half:.3f}{layer}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    metric = d["probes"][0]["metric"] if d.get("probes") else "accuracy"
    lines.append(f"({metric}, mean over seeds {d.get('seeds', [])}; ± half-width of the 95 % bootstrap CI over "
                 f"test items; @Lk: the layer chosen on validation, not on test)")
    return "\n".join(lines)


def format_attributes_table(attrs: Mapping[str, Any]) -> str:
    """Plain-text table of the attribute metrics: one row per metric, one column per system, each cell the
    value ± half its 95 % CI; ``*`` marks the system that beats every other by more than the CI."""
    systems = [s["name"] for s in attrs.get("systems", [])]
    cmp = attrs.get("comparisons", {})
    rows = [["metric"] + systems]
    for key, _, _ in _ATTRIBUTE_METRICS:
        c = cmp.get(key)
        if c is None:
            continue
        row = [key]
        for s in systems:
            v = c["values"].get(s)
            row.append("-" if v is None else f"{v[0]:.3f}±{(v[1][1] - v[1][0]) / 2:.3f}"
                       + ("*" if c.get("best") == s else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("(± half-width of the 95 % bootstrap CI; *: better than every other system by more than the CI)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_task(task: str, rows: list[dict[str, Any]], path: str, *, chance: Optional[float] = None,
              description: str = "") -> None:
    """Score per layer for one task: layered models as lines with CI bands, single-output
    models as horizontal lines with CI bands, chance dotted."""
    plt = _plt()
    models = _model_order(list(dict.fromkeys(r["model"] for r in rows)))
    layered = {m: sorted((r for r in rows if r["model"] == m and r["layer"] is not None), key=lambda r: r["layer"])
               for m in models}
    max_layer = max([r["layer"] for rs in layered.values() for r in rs] or [1])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x_lo, x_hi = 0.6, max(max_layer, 1) + 0.4
    for m in models:
        color = _model_color(m, models)
        if layered[m]:
            xs = [r["layer"] for r in layered[m]]
            ys = [r["score"] for r in layered[m]]
            ax.plot(xs, ys, marker="o", color=color, label=m, lw=2 if m == "student" else 1.5,
                    ls="-" if m == "student" else "--")
            ax.fill_between(xs, [r["ci"][0] for r in layered[m]], [r["ci"][1] for r in layered[m]], color=color,
                            alpha=0.15, lw=0)
        else:
            for r in rows:
                if r["model"] == m and r["layer"] is None:
                    ax.axhline(r["score"], color=color, lw=1.5, label=m)
                    ax.axhspan(r["ci"][0], r["ci"][1], color=color, alpha=0.08, lw=0)
    if chance is not None:
        ax.axhline(chance, color="black", lw=1, ls=":", label="chance (majority)")
    ax.set_xlim(x_lo, x_hi)
    ax.set_xticks(range(1, max_layer + 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("student layer")
    ax.set_ylabel(rows[0]["metric"] if rows else "accuracy")
    ax.set_title(f"{task}" + (f": {description}" if description else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_overview(best: Mapping[str, Mapping[str, Mapping[str, Any]]], tasks: list[str], models: list[str],
                  path: str) -> None:
    """Heatmap of the best score per task (rows) and model (columns)."""
    import numpy as np

    plt = _plt()
    grid = np.full((len(tasks), len(models)), np.nan)
    for i, t in enumerate(tasks):
        for j, m in enumerate(models):
            b = best.get(t, {}).get(m)
            if b is not None:
                grid[i, j] = b["score"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(models), 0.9 + 0.42 * len(tasks)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    for i in range(len(tasks)):
        for j in range(len(models)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("test score at the validation-chosen layer, per task and model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_metrics_csv(text: str, path: str) -> bool:
    """Loss curves from a training metrics.csv (when its loss_curve.png is missing)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    keys = [k for k in (rows[0].keys() if rows else []) if k == "loss" or k.endswith("/ce")]
    if not rows or not keys or "step" not in rows[0]:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    steps = [float(r["step"]) for r in rows]
    for k in keys:
        ax.plot(steps, [float(r[k]) if r.get(k) not in (None, "", "nan") else float("nan") for r in rows], label=k)
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- extras


def _training_section(train_output: str, storage: Storage, tmp: str) -> dict[str, Any]:
    metrics = join_uri(train_output, TRAIN_METRICS_DIR)
    csv_uri, png_uri = join_uri(metrics, METRICS_FILE), join_uri(metrics, LOSS_CURVE_FILE)
    out: dict[str, Any] = {"train_output": train_output, "metrics_csv": None, "plot": None}
    text = storage.read_text(csv_uri) if storage.exists(csv_uri) else None
    if text is not None:
        out["metrics_csv"] = csv_uri
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows:
            out["steps"] = int(float(rows[-1].get("step", 0) or 0))
            losses = learned_losses(rows)
            if losses:
                out["first_loss"], out["last_loss"] = losses[0], losses[-1]
    if storage.exists(png_uri):
        with open(os.path.join(tmp, "train_loss_curve.png"), "wb") as f:
            f.write(storage.read_bytes(png_uri))
        out["plot"] = "train_loss_curve.png"
    elif text is not None and _plot_metrics_csv(text, os.path.join(tmp, "train_loss_curve.png")):
        out["plot"] = "train_loss_curve.png"
    return out


def _codebook_section(tokens_output: str, storage: Storage, tmp: str) -> list[dict[str, Any]]:
    root = join_uri(tokens_output, CODEBOOKS_DIR)
    if not storage.exists(root):  # a tokenize output without codebooks (yet): nothing to show
        return []
    out = []
    for entry in storage.list_files(root, extensions=["png"]):
        uri = entry.uri
        if posixpath.basename(uri) != USAGE_PLOT_FILE:
            continue
        name = posixpath.basename(posixpath.dirname(uri.replace(os.sep, "/")))
        local = f"codebook_{_safe(name)}.png"
        with open(os.path.join(tmp, local), "wb") as f:
            f.write(storage.read_bytes(uri))
        info: dict[str, Any] = {"name": name, "plot": local, "usage_png": uri}
        meta_uri = join_uri(posixpath.dirname(uri) if "://" in uri else os.path.dirname(uri), CODEBOOK_META_FILE)
        if storage.exists(meta_uri):
            try:
                meta = json.loads(storage.read_text(meta_uri))
            except ValueError:
                meta = {}
            extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
            for key in ("heldout_relative_loss", "heldout_loss"):
                value = meta.get(key, extra.get(key))
                if value is not None:
                    info["heldout_relative_loss"] = value
                    break
            ppl = meta.get("perplexity")
            if isinstance(ppl, list) and ppl:
                info["mean_perplexity"] = sum(ppl) / len(ppl)
        out.append(info)
    return sorted(out, key=lambda i: i["name"])


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1150px;
     color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.best{font-weight:bold;background:#eef6ee}.muted{color:#888}
img{max-width:100%;border:1px solid #eee}figure{margin:12px 0 24px}figcaption{font-size:13px;color:#555}
code{background:#f4f4f4;padding:1px 4px}
"""

# Marks every image as loaded or broken once the page has loaded (data-loaded="1"/"0"),
# and lists broken ones at the top: a user sees a missing plot at once, and the headless
# browser test reads the marks from the dumped DOM.
_SCRIPT = """
window.addEventListener('load', function () {
  var broken = [];
  document.querySelectorAll('img').forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute('data-loaded', ok ? '1' : '0');
    if (!ok) broken.push(img.getAttribute('src'));
  });
  document.body.setAttribute('data-images-checked', String(document.images.length));
  if (broken.length) {
    var p = document.createElement('p');
    p.id = 'broken-images';
    p.style.color = '#b00';
    p.textContent = 'Missing images: ' + broken.join(', ');
    document.body.insertBefore(p, document.body.firstChild);
  }
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt_ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if raw else f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_ablation(figures: dict[str, Any], path: str) -> None:
    """Grouped bars per task (and the two means) for the ablation's students and the random student,
    with 95 % CI whiskers where a task has them."""
    plt = _plt()
    labels = [lbl for lbl in list(figures["students"]) + ["random_student"]
              if any(lbl in v for v in figures["tasks"].values())]
    groups = list(figures["tasks"]) + ["mean: all", "mean: mixed"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(groups) + 2), 4.2))
    width = 0.8 / max(1, len(labels))
    for k, lbl in enumerate(labels):
        xs, ys, err = [], [], [[], []]
        for g, name in enumerate(groups):
            if name.startswith("mean: "):
                v = figures["means"][name[6:]].get(lbl)
                lo = hi = v
            else:
                e = figures["tasks"][name].get(lbl)
                v = None if e is None else e["score"]
                lo, hi = (e["ci"] if e is not None and e.get("ci") else (v, v))
            if v is None:
                continue
            xs.append(g + (k - (len(labels) - 1) / 2) * width)
            ys.append(v)
            err[0].append(max(0.0, v - lo))
            err[1].append(max(0.0, hi - v))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=lbl, color=_ABLATION_COLORS[k % len(_ABLATION_COLORS)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(labels))
    ax.set_title("one teacher or two: students trained on the same shards")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _checks_html(checks: list[dict[str, Any]]) -> str:
    """The distillation check table (:func:`spear.evaluation.claims.distillation_checks`), with the best
    teacher's tokens where they were probed (between the teacher and the student: what the codebooks kept)."""
    with_tokens = any(c.get("tokens_score") is not None for c in checks)
    rows = []
    for c in checks:
        verdict = {True: "holds", False: "does not hold", None: "no teacher clearly beats fbank: not a test"}[c["holds"]]
        tokens = ["-" if c.get("tokens_score") is None else f"{c['tokens_score']:.3f}"] if with_tokens else []
        rows.append([c["task"], c["teacher"] or "-", "-" if c["teacher_score"] is None else f"{c['teacher_score']:.3f}"]
                    + tokens + [f"{c['floor_score']:.3f}", f"{c['student_score']:.3f}", f"{c['baseline_score']:.3f}",
                                f"{c['margin']:+.3f}", f"{c['ci']:.3f}", verdict])
    return _table(["task", "best teacher", "teacher"] + (["its tokens"] if with_tokens else [])
                  + ["fbank", "student", "random student", "student - random", "CI half-width", "claim"], rows)


def _together_html(f: dict[str, Any]) -> str:
    names = f["teachers"] + [f["combined"]] + [m for m in f["means"]["all"] if m == "fbank"]
    rows = [[f"mean over {'all tasks' if g == 'all' else 'mixed tasks'}"]
            + ["-" if f["means"][g].get(m) is None else f"{f['means'][g][m]:.3f}" for m in names]
            + ["-" if f["gain"].get(g) is None else f"{f['gain'][g]:+.3f}"] for g in ("all", "mixed")]
    return ("<p>The teachers' embeddings probed side by side (<code>evaluate.combined_teachers</code>) against "
            "each one alone: what a student distilled from all of them could know at most. The last column is "
            "the side-by-side row's gain over the best single teacher: the most a dual-teacher student can gain "
            "over a single-teacher one from what its teachers know (per task in the table above).</p>"
            + _table(["", *names, "gain over the best teacher"], rows))


def _ablation_html(figures: dict[str, Any], plot: Optional[str], from_this_run: bool) -> str:
    src = ("measured in this evaluation" if from_this_run else
           f"the last saved figures, measured {_e(figures['measured'])} with <code>{_e(figures['command'])}</code>"
           " (not this run's students)")
    if figures.get("train_steps"):
        src += f"; each student trained {int(figures['train_steps'])} steps"
    labels = list(figures["students"]) + [b for b in ("random_student", "fbank")
                                          if any(b in v for v in figures["tasks"].values())]
    rows = []
    for t, v in figures["tasks"].items():
        rows.append([t] + [("-" if v.get(lbl) is None else
                            f"{v[lbl]['score']:.3f} {_fmt_ci(v[lbl].get('ci'))}".strip()) for lbl in labels])
    for g in ("all", "mixed"):
        m = figures["means"].get(g, {})
        rows.append([f"mean over {'all tasks' if g == 'all' else 'mixed tasks'}"]
                    + ["-" if m.get(lbl) is None else f"{m[lbl]:.3f}" for lbl in labels])
    best = figures.get("best", {})
    parts = [f"<p>The dual-teacher student against students trained the same way on one teacher's tokens "
             f"(<code>train.teacher_roles</code>); {src}. Best student: {_e(best.get('all'))} on the mean over "
             f"all tasks, {_e(best.get('mixed'))} on the mixed speech + audio tasks "
             f"({_e(', '.join(figures.get('mixed_tasks', [])))}).</p>", _table(["task"] + labels, rows)]
    if plot:
        parts.append(f"<figure><img src='{plot}' alt='ablation'></figure>")
    return "".join(parts)


# --------------------------------------------------------------------------- utterance-level attributes

# Metrics of the attribute section: (comparison key, label, what the value is, lower is better).
_ATTRIBUTE_METRICS = [
    ("verification/eer", "speaker verification EER", False),
    ("verification/min_dcf@0.01", "speaker verification minDCF (p=0.01)", False),
    ("retrieval/all/speech_to_speech/R@1", "cross-lingual retrieval speech->speech R@1", True),
    ("retrieval/all/speech_to_speech/R@5", "cross-lingual retrieval speech->speech R@5", True),
    ("retrieval/seen/speech_to_speech/R@1", "speech->speech R@1, sentences seen in post-training", True),
    ("retrieval/unseen/speech_to_speech/R@1", "speech->speech R@1, unseen sentences", True),
    ("retrieval/all/speech_to_text/R@1", "speech->text R@1", True),
    ("counting/synthetic/probe", "counting accuracy (held-out synthetic set, probe)", True),
    ("counting/event_count/probe", "demo corpus event_count accuracy (probe)", True),
]
_ATTRIBUTE_COLORS = ["#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]


def _probit(p: Any) -> Any:
    """The standard normal deviate of probabilities (a DET plot's axes), clipped to [1e-4, 1 - 1e-4]."""
    import numpy as np
    from statistics import NormalDist

    nd = NormalDist()
    return np.array([nd.inv_cdf(min(max(float(v), 1e-4), 1 - 1e-4)) for v in np.atleast_1d(p)])


def plot_det(verification: dict[str, Any], path: str) -> None:
    """DET curves (miss against false-alarm rate on normal-deviate axes) of every system, EER marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    systems = [(n, v) for n, v in verification["systems"].items() if "det" in v]
    for k, (name, v) in enumerate(systems):
        color = _ATTRIBUTE_COLORS[k % len(_ATTRIBUTE_COLORS)]
        ax.plot(_probit(v["det"]["fa"]), _probit(v["det"]["miss"]), color=color,
                label=f"{name} (EER {100 * v['eer']:.1f} %)", lw=2 if k == 0 else 1.5)
        ax.plot(_probit(v["eer"]), _probit(v["eer"]), "o", color=color, ms=5)
    ticks = [0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8]
    ax.set_xticks(_probit(ticks), [f"{100 * t:g}" for t in ticks], fontsize=8)
    ax.set_yticks(_probit(ticks), [f"{100 * t:g}" for t in ticks], fontsize=8)
    lim = _probit([0.0005, 0.9])
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.plot(lim, lim, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    t = verification["trials"]
    ax.set_title(f"speaker verification: {t['target']} target / {t['nontarget']} non-target trials, "
                 f"{t['speakers']} held-out speakers", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_retrieval_matrix(block: dict[str, Any], languages: list[str], system: str, path: str) -> None:
    """Language x language recall@1 (query language in rows, gallery language in columns) of one system."""
    import numpy as np

    plt = _plt()
    grid = np.array([[np.nan if v is None else v for v in row] for row in block["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.8 + 0.8 * len(languages), 1.4 + 0.7 * len(languages)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(len(languages)), languages)
    for i in range(len(languages)):
        for j in range(len(languages)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xlabel("gallery language")
    ax.set_ylabel("query language")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"{system}: speech->speech recall@1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_attribute_bars(comparisons: dict[str, Any], systems: list[str], path: str) -> None:
    """One panel per attribute metric: each system's value with its 95 % CI as error bars."""
    plt = _plt()
    metrics = [(k, label) for k, label, _ in _ATTRIBUTE_METRICS if k in comparisons]
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, (key, label) in zip(axes.flat, metrics):
        c = comparisons[key]
        names = [s for s in systems if s in c["values"]]
        vals = [c["values"][s][0] for s in names]
        err = [[max(0.0, v - c["values"][s][1][0]) for s, v in zip(names, vals)],
               [max(0.0, c["values"][s][1][1] - v) for s, v in zip(names, vals)]]
        ax.bar(range(len(names)), vals, yerr=err, capsize=3,
               color=[_ATTRIBUTE_COLORS[systems.index(s) % len(_ATTRIBUTE_COLORS)] for s in names])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(label + (" (lower is better)" if not c["higher_is_better"] else ""), fontsize=8, wrap=True)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_attributes(attrs: dict[str, Any], folder: str) -> dict[str, str]:
    """The attribute section's plots under ``folder``: {plot name: file name}."""
    plots: dict[str, str] = {}
    systems = [s["name"] for s in attrs.get("systems", [])]
    ver = attrs.get("verification", {})
    if any("det" in v for v in ver.get("systems", {}).values()):
        plot_det(ver, os.path.join(folder, "attributes_det.png"))
        plots["attributes_det"] = "attributes_det.png"
    block = attrs.get("retrieval", {}).get("subsets", {}).get("all", {}).get("speech_to_speech", {})
    main = next((s for s in systems if "matrix" in block.get(s, {})), None)
    if main is not None:
        plot_retrieval_matrix(block[main], attrs["retrieval"]["languages"], main,
                              os.path.join(folder, "attributes_retrieval.png"))
        plots["attributes_retrieval"] = "attributes_retrieval.png"
    if any(k in attrs.get("comparisons", {}) for k, _, _ in _ATTRIBUTE_METRICS):
        plot_attribute_bars(attrs["comparisons"], systems, os.path.join(folder, "attributes_bars.png"))
        plots["attributes_bars"] = "attributes_bars.png"
    return plots


def frame_probe_changes(best: Mapping[str, Mapping[str, Mapping[str, Any]]], before: str, after: str
                        ) -> list[dict[str, Any]]:
    """Per probe task, the frame-level probes before and after post-training: both scores, the change
    and the verdict: ``regression`` / ``gain`` when it exceeds the larger CI half-width, else ``same``.

    >>> rows = frame_probe_changes({"t": {"in": {"score": 0.9, "ci": [0.85, 0.95]},
    ...                                   "out": {"score": 0.7, "ci": [0.65, 0.75]}}}, "in", "out")
    >>> rows[0]["change"] < 0, rows[0]["verdict"]
    (True, 'regression')
    """
    from spear.evaluation.claims import half_width

    rows = []
    for task, models in best.items():
        if before not in models or after not in models:
            continue
        b, a = models[before], models[after]
        change, hw = a["score"] - b["score"], max(half_width(a), half_width(b))
        verdict = "same" if abs(change) <= hw + 1e-12 else ("gain" if change > 0 else "regression")
        rows.append({"task": task, "before": b["score"], "before_layer": b.get("layer"), "after": a["score"],
                     "after_layer": a.get("layer"), "change": change, "ci": hw, "verdict": verdict})
    return rows


def _value_ci(v: Any, ci: Any) -> str:
    return f"{v:.3f} {_fmt_ci(ci)}".strip()


def posttrain_claims(attrs: Mapping[str, Any], best: Mapping[str, Any]) -> dict[str, Any]:
    """The post-training claims of an attribute evaluation: ``checks`` (the post-trained model against its
    input and fbank, :func:`~spear.evaluation.claims.posttrain_checks`) and, per further post-trained system
    (e.g. trained without the counting tasks), ``with_without[name]`` (:func:`~spear.evaluation.claims.with_without`
    on the attribute metrics and the frame-level probes)."""
    cmp = attrs.get("comparisons", {})
    others = [s["name"] for s in attrs.get("systems", []) if s.get("kind") == "posttrained" and s["name"] != "posttrained"]
    return {"checks": posttrain_checks(cmp),
            "with_without": {o: with_without(cmp, best, without_model=o, without_student=f"student:{o}")
                             for o in others}}


def _posttrain_claims_html(attrs: Mapping[str, Any], best: Mapping[str, Any]) -> str:
    claims = posttrain_claims(attrs, best)
    rows = []
    for c in claims["checks"]:
        verdict = {True: "holds", False: "does not hold", None: "not measured"}[c["holds"]]
        rows.append([c["what"], "-" if c["model_value"] is None else f"{c['model_value']:.3f}"]
                    + ["-" if c["baselines"].get(b) is None else f"{c['baselines'][b]:.3f}" for b in ("input", "fbank")]
                    + [verdict])
    parts = ["<h3>Did post-training give better utterance embeddings than its input model and fbank?</h3>",
             "<p>Each claim holds when the post-trained model beats both by more than the larger CI half-width.</p>",
             _table(["claim", "post-trained", "input (mean-pooled)", "fbank", "verdict"], rows)]
    for other, table in claims["with_without"].items():
        counts = {v: sum(1 for r in table if r["verdict"] == v) for v in ("with", "without", "same")}
        parts.append(f"<h3>The same post-training with and without what <code>{_e(other)}</code> lacks</h3>"
                     f"<p>{len(table)} measures (the attribute metrics and the frame-level probes): better with "
                     f"{counts['with']}, better without {counts['without']}, the same within the CI {counts['same']}."
                     "</p>")
        parts.append(_table(["measure", "post-trained", other, "difference (+: post-trained better)",
                             "CI half-width", "better"],
                            [[r["measure"], f"{r['with']:.3f}", f"{r['without']:.3f}", f"{r['difference']:+.3f}",
                              f"{r['ci']:.3f}", {"with": "post-trained", "without": other, "same": "same"}[r["verdict"]]]
                             for r in table]))
    return "".join(parts)


def _attributes_html(attrs: dict[str, Any], plots: dict[str, str], best: Mapping[str, Any]) -> str:
    systems = [s["name"] for s in attrs.get("systems", [])]
    cmp = attrs.get("comparisons", {})
    parts = ["<p>Utterance-level embeddings side by side: " + ", ".join(
        f"<code>{_e(s['name'])}</code> ({_e(s['kind'])})" for s in attrs.get("systems", []))
        + ". Each metric uses a system's embedding of that kind (speaker, semantic, counting) or its one pooled "
          "embedding. CIs: 95 % bootstrap (verification: over speakers; retrieval: over sentences; accuracies: "
          "over test items). Bold: the system that beats every other by more than the larger CI half-width of "
          "each pair.</p>"]
    rows = []
    for key, label, _ in _ATTRIBUTE_METRICS:
        c = cmp.get(key)
        if c is None:
            continue
        cells = [f"<td>{_e(label)}</td>"]
        for s in systems:
            v = c["values"].get(s)
            if v is None:
                cells.append("<td class='muted'>-</td>")
            else:
                cls = " class='best'" if c.get("best") == s else ""
                cells.append(f"<td{cls}>{_e(_value_ci(v[0], v[1]))}</td>")
        beats = "; ".join(f"{a} &gt; {b}" for a, b in c["better"]) or "none by more than the CI"
        cells.append(f"<td>{beats}</td>")
        rows.append(cells)
    if rows:
        parts.append(_table(["metric"] + systems + ["better by more than the CI"], rows, raw=True))
    parts.append(_posttrain_claims_html(attrs, best))
    if "attributes_bars" in plots:
        parts.append(f"<figure><img src='{plots['attributes_bars']}' alt='attribute metrics per system'></figure>")
    excluded = attrs.get("data", {}).get("excluded", {})
    notes = [f"{_e(what)}: " + ", ".join(f"{_e(r)} ({n})" for r, n in reasons.items())
             for what, reasons in excluded.items() if reasons]
    if notes:
        parts.append("<p class='muted'>rows left out: " + "; ".join(notes) + "</p>")
    ver = attrs.get("verification", {})
    if ver.get("not_applicable"):
        parts.append(f"<p class='muted'>speaker verification not run: {_e(ver['not_applicable'])}</p>")
    if "attributes_det" in plots:
        t = ver["trials"]
        parts.append(f"<figure><img src='{plots['attributes_det']}' alt='DET curves'><figcaption>{t['target']} target "
                     f"and {t['nontarget']} non-target trials over {t['speakers']} held-out speakers "
                     f"({t['utterances']} utterances), cosine scoring.</figcaption></figure>")
    ret = attrs.get("retrieval", {})
    if ret.get("not_applicable"):
        parts.append(f"<p class='muted'>retrieval not run: {_e(ret['not_applicable'])}</p>")
    if "attributes_retrieval" in plots:
        parts.append(f"<figure><img src='{plots['attributes_retrieval']}' alt='retrieval matrix'></figure>")
    for subset, block in ret.get("subsets", {}).items():
        s2s = block.get("speech_to_speech", {})
        pairs = sorted({p for v in s2s.values() for p in v.get("pairs", {})})
        if pairs:
            parts.append(f"<details><summary>speech->speech recall@1 per language pair ({_e(subset)} sentences: "
                         f"{block['sentences']} sentences, {block['utterances']} utterances)</summary>" + _table(
                             ["query->gallery"] + systems,
                             [[p] + [_value_ci(s2s[s]["pairs"][p]["recall"]["R@1"], s2s[s]["pairs"][p]["recall_ci"]["R@1"])
                                     if p in s2s.get(s, {}).get("pairs", {}) else "-" for s in systems] for p in pairs])
                         + "</details>")
        for s, v in block.get("speech_to_text", {}).items():
            if "not_applicable" in v and subset == "all":
                parts.append(f"<p class='muted'>speech->text for {_e(s)}: not applicable ({_e(v['not_applicable'])})</p>")
    syn = attrs.get("counting", {}).get("synthetic")
    if syn:
        tasks = syn["tasks"]
        trows = []
        for s in systems:
            v = syn["systems"].get(s, {})
            if "probe" in v:
                trows.append([f"{s} (probe on {v['embedding']})"] + [_value_ci(v["probe"]["tasks"][t]["accuracy"],
                             v["probe"]["tasks"][t]["ci"]) for t in tasks]
                             + [_value_ci(v["probe"]["accuracy"], v["probe"]["ci"])])
            if "head" in v:
                trows.append([f"{s} (its counting head)"] + [
                    "-" if t not in v["head"]["tasks"] else f"{v['head']['tasks'][t]:.3f}" for t in tasks]
                    + [_value_ci(v["head"]["accuracy"], v["head"]["ci"])])
        parts.append(f"<p>Counting: a held-out synthetic set (seed {_e(syn.get('seed', '?'))}, "
                     f"{syn['num_train']} probe-training / {syn['num_test']} test clips, balanced over every count); "
                     f"chance per task is 1 / classes ({_e(syn['num_classes'])}).</p>"
                     + _table(["system"] + tasks + ["all tasks"], trows))
    changes = attrs.get("frame_probes")
    if changes:
        rows = frame_probe_changes(best, changes["before"], changes["after"])
        if rows:
            parts.append(f"<p>Frame-level probes before (<code>{_e(changes['before'])}</code>) and after "
                         f"(<code>{_e(changes['after'])}</code>) post-training, each at its validation-chosen "
                         "layer: a regression is a drop by more than the larger CI half-width.</p>" + _table(
                             ["task", "before", "after", "change", "CI half-width", "verdict"],
                             [[r["task"], f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['change']:+.3f}",
                               f"{r['ci']:.3f}", r["verdict"]] for r in rows]))
    return "".join(parts)


def _render_html(d: dict[str, Any], plots: dict[str, str], training: Optional[dict[str, Any]],
                 codebooks: list[dict[str, Any]], ablation: Optional[dict[str, Any]] = None) -> str:
    best = d["best"]
    models = _model_order(list(dict.fromkeys(r["model"] for r in d["probes"])))
    task_info = {t["name"]: t for t in d["tasks"]}
    probed = [t["name"] for t in d["tasks"] if t["name"] in best]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SPEAR evaluation</title>"
             f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
             "<h1>SPEAR evaluation: linear probes on frozen features</h1>",
             f"<p>{len(d['probes'])} probes over {len(probed)} tasks and {len(models)} models; "
             f"seeds {_e(d['seeds'])}; generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} in "
             f"{d.get('wall_seconds', 0):.0f} s. Score: test accuracy (mean over seeds). CI: 95 % percentile "
             f"bootstrap over test items (over clips for frame tasks) of the seed-averaged accuracy. "
             f"Each model's layer (and each seed's L2) is chosen on a validation carve of the probe's "
             f"training split; the test score is reported at that choice and chooses nothing. "
             f"Raw data: <a href='results.json'>results.json</a>.</p>"]
    if any(m.startswith("teacher:") for m in models):
        parts.append("<p class='muted'><code>fbank</code> is the raw 128-bin Kaldi log-mel fbank (100 Hz) floor; "
                     "<code>teacher:&lt;kind&gt;</code> are the teachers' embeddings (e.g. <code>teacher:fbank</code>"
                     " is the audio teacher, log-mel pooled to 25 Hz).</p>")
    if any(m.startswith("tokens:") for m in models):
        parts.append("<p class='muted'><code>tokens:&lt;kind&gt;</code> is that teacher's embeddings encoded with the "
                     "token set's MVQ codebooks and decoded back: what the student is trained to predict. Below the "
                     "teacher, the codebooks lost that knowledge; far above the student, training has not reached "
                     "it.</p>")

    # Overview.
    parts.append("<h2 id='overview'>Overview</h2>")
    rows = []
    for t in probed:
        scores = {m: best[t][m]["score"] for m in models if m in best[t]}
        top = max(scores.values()) if scores else None
        cells = [f"<td>{_e(t)}</td>"]
        for m in models:
            b = best[t].get(m)
            if b is None:
                cells.append("<td class='muted'>-</td>")
                continue
            layer = f" @{_layer_label(b['layer'])}" if b["layer"] is not None else ""
            txt = f"{b['score']:.3f} {_fmt_ci(b['ci'])}{layer}"
            cls = " class='best'" if b["score"] == top else ""
            cells.append(f"<td{cls}>{_e(txt)}</td>")
        rows.append(cells)
    parts.append(_table(["task"] + models, rows, raw=True))
    if "overview" in plots:
        parts.append(f"<figure><img src='{plots['overview']}' alt='overview'></figure>")

    checks = distillation_checks(best)
    if checks:
        parts.append("<h2 id='distillation'>Did the teachers' knowledge reach the student?</h2>"
                     "<p>Where a teacher beats the fbank floor by more than the CI it knows something fbank does "
                     "not say; there the trained student should beat the random student (same architecture, "
                     "untrained) by more than the CI too (each: the larger 95 % CI half-width of the two).</p>"
                     + _checks_html(checks))
    together = combined_teacher_figures(best)
    if together is not None:
        parts.append("<h2 id='teachers-together'>What the teachers know together</h2>" + _together_html(together))
    if ablation is not None:
        parts.append("<h2 id='ablation'>One teacher or two</h2>"
                     + _ablation_html(ablation, plots.get("ablation"), ablation.get("from_this_run", False)))
    if d.get("attributes"):
        parts.append("<h2 id='attributes'>Utterance-level attributes (post-training)</h2>"
                     + _attributes_html(d["attributes"], plots, best))

    # Per task.
    parts.append("<h2 id='tasks'>Score per layer, per task</h2>")
    for t in probed:
        info = task_info[t]
        counts = info["class_counts"]
        n_tr, n_te = sum(counts["train"].values()), sum(counts["test"].values())
        unit = "frames" if info["level"] == "frame" else "clips"
        parts.append(f"<h3 id='task-{_e(_safe(t))}'>{_e(t)}</h3><p>{_e(info['description'])} "
                     f"({info['level']} level; {n_tr} train / {n_te} test {unit}, {len(counts['train'])} classes; "
                     f"source: {_e(info['source'])})</p>")
        if t in plots:
            parts.append(f"<figure><img src='{plots[t]}' alt='{_e(t)} per layer'></figure>")
        trs = sorted((r for r in d["probes"] if r["task"] == t),
                     key=lambda r: (models.index(r["model"]), r["layer"] or 0))
        chosen = {m: best[t][m]["layer"] for m in best[t]}
        parts.append(_table(["model", "layer", "score", "95% CI", "macro-F1", "seed scores", "L2 per seed",
                             "validation", "chance"],
                            [[r["model"], ("" if r["layer"] is None else str(r["layer"]))
                              + (" (chosen)" if r["layer"] is not None and chosen.get(r["model"]) == r["layer"] else ""),
                              f"{r['score']:.3f}", _fmt_ci(r["ci"]), f"{r['macro_f1']:.3f}",
                              " ".join(f"{s:.3f}" for s in r["seed_scores"]), " ".join(f"{v:g}" for v in r["l2"]),
                              "-" if r.get("val_score") is None else f"{r['val_score']:.3f}", f"{r['chance']:.3f}"]
                             for r in trs]))
        cls = sorted(set(counts["train"]) | set(counts["test"]))
        parts.append("<details><summary>class counts</summary>" + _table(
            ["class", "train", "test"],
            [[c, str(counts["train"].get(c, 0)), str(counts["test"].get(c, 0))] for c in cls])
            + "</details>")
    for s in d.get("skipped_tasks", []):
        parts.append(f"<p class='muted'>task {_e(s['task'])} skipped: {_e(s['reason'])}</p>")

    # Training and tokens.
    parts.append("<h2 id='training'>Training</h2>")
    if training is None:
        parts.append("<p class='muted'>no training output given (<code>--train-output</code>).</p>")
    else:
        facts = [f"output <code>{_e(training['train_output'])}</code>"]
        if training.get("steps") is not None:
            facts.append(f"{training['steps']} steps")
        if training.get("first_loss") is not None:
            facts.append(f"loss {training['first_loss']:.3f} &rarr; {training['last_loss']:.3f}")
        parts.append("<p>" + "; ".join(facts) + "</p>")
        if training.get("plot"):
            parts.append(f"<figure><img src='{training['plot']}' alt='training loss'>"
                         f"<figcaption>loss curves from <code>{_e(training.get('metrics_csv') or '')}</code>"
                         "</figcaption></figure>")
        else:
            parts.append("<p class='muted'>no metrics found under the training output.</p>")
    parts.append("<h2 id='codebooks'>Codebook usage</h2>")
    if not codebooks:
        parts.append("<p class='muted'>no tokenize output given (<code>--tokens</code>) or no codebook usage "
                     "plots in it.</p>")
    for cb in codebooks:
        extra = []
        if cb.get("heldout_relative_loss") is not None:
            extra.append(f"held-out relative reconstruction loss {float(cb['heldout_relative_loss']):.4f}")
        if cb.get("mean_perplexity") is not None:
            extra.append(f"mean codebook perplexity {float(cb['mean_perplexity']):.1f}")
        parts.append(f"<figure><img src='{cb['plot']}' alt='codebook usage {_e(cb['name'])}'>"
                     f"<figcaption>{_e(cb['name'])}{': ' + _e('; '.join(extra)) if extra else ''}"
                     "</figcaption></figure>")

    # Corpus and models.
    c = d["corpus"]
    parts.append(f"<h2 id='corpus'>Corpus</h2><p>{c['files']} files, {c['minutes']:.1f} minutes of audio.</p>")
    for key, title in (("by_domain", "domain"), ("by_format", "format"), ("by_sample_rate", "sample rate (Hz)"),
                       ("by_channels", "channels")):
        parts.append(_table([title, "files", "minutes"],
                            [[k, str(v["files"]), f"{v['minutes']:.2f}"] for k, v in c.get(key, {}).items()]))
    for s in d.get("skipped_files", []):
        parts.append(f"<p class='muted'>skipped {_e(s['uri'])}: {_e(s['reason'])}</p>")
    parts.append("<h2 id='models'>Models</h2>")
    parts.append(_table(["model", "frame rate (Hz)", "layers", "dims", "features (s)", "probes (s)"],
                        [[m["name"], "-" if m.get("frame_rate") is None else f"{m['frame_rate']:g}",
                          " ".join("-" if v is None else str(v) for v in m["layers"]),
                          " ".join(str(v) for v in sorted(set(m["dims"]))),
                          f"{m['extract_seconds']:.1f}", f"{m['probe_seconds']:.1f}"] for m in d["models"]]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(summary: Any, output: str, storage: Optional[Storage] = None, *,
                 train_output: Optional[str] = None, tokens_output: Optional[str] = None,
                 ablation: Optional[dict[str, Any]] = None) -> str:
    """Write ``index.html``, the plots and ``results.json`` under ``output``; returns the page's URI.

    ``summary``: an EvaluateSummary (its ``extras`` get the training / codebook sections) or
    its dict. ``ablation``: figures of :func:`spear.evaluation.claims.ablation_figures` for the
    "one teacher or two" section (``from_this_run``: whether they come from this summary's
    students). The folder is built locally, then every file is written through ``storage``.
    """
    storage = storage or Storage()
    d = _as_dict(summary)
    with tempfile.TemporaryDirectory() as tmp:
        plots: dict[str, str] = {}
        task_info = {t["name"]: t for t in d["tasks"]}
        for t in [t["name"] for t in d["tasks"] if t["name"] in d["best"]]:
            rows = [r for r in d["probes"] if r["task"] == t]
            fname = f"task_{_safe(t)}.png"
            plot_task(t, rows, os.path.join(tmp, fname), chance=rows[0]["chance"] if rows else None,
                      description=task_info[t]["description"])
            plots[t] = fname
        if d["best"]:
            models = _model_order(list(dict.fromkeys(r["model"] for r in d["probes"])))
            plot_overview(d["best"], [t["name"] for t in d["tasks"] if t["name"] in d["best"]], models,
                          os.path.join(tmp, "overview.png"))
            plots["overview"] = "overview.png"
        if ablation is not None:
            plot_ablation(ablation, os.path.join(tmp, "ablation.png"))
            plots["ablation"] = "ablation.png"
        if d.get("attributes"):
            plots.update(plot_attributes(d["attributes"], tmp))
        training = _training_section(train_output, storage, tmp) if train_output else None
        codebooks = _codebook_section(tokens_output, storage, tmp) if tokens_output else []
        extras = {"training": training, "codebooks": codebooks, "plots": plots,
                  "distillation_checks": distillation_checks(d["best"]), "ablation": ablation,
                  "posttrain_claims": posttrain_claims(d["attributes"], d["best"]) if d.get("attributes") else None}
        if hasattr(summary, "extras"):
            summary.extras = extras
        d["extras"] = extras
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(_render_html(d, plots, training, codebooks, ablation))
        with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1, default=str)
        storage.makedirs(output)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(join_uri(output, name), f.read())
    return join_uri(output, "index.html")
