"""`spear evaluate` on a post-trained model: the utterance-level attribute evaluation beside the probes.

When the model under evaluation is a post-trained export (:func:`spear.stages.artefacts.load_posttrained`;
``spear posttrain`` writes it to ``OUTPUT/posttrain/model``), :mod:`spear.pipeline.evaluate_job` asks this
module for three things:

- :func:`posttrained_config`: whether the student folder is such an export (its ``posttrain.json``);
- :func:`with_input_model`: the probed models plus the *input* model (the one post-training started
  from, named in the export's metadata, or given), probed layer by layer as ``student:input`` (a
  student export) or ``released:<name>`` (a released SPEAR model) beside the post-trained encoder
  (``student``): the frame-level probes before and after, so a regression is visible;
- :func:`evaluate_posttrained`: :func:`spear.evaluation.attributes.evaluate_attributes` over three
  systems, the post-trained model's attribute embeddings (``posttrained``), the input model's
  mean-pooled layers (``input``) and fbank (``fbank``), on the held-out table, a held-out synthetic
  counting set and the demo corpus's ``event_count``.

The held-out table is, in this order: ``eval_table`` (a prepared ``eval.parquet``), the
``eval_manifests`` read and decoded here (bad rows set aside with their reasons, as ``spear
posttrain`` does), or the table ``spear posttrain`` prepared next to the export
(``OUTPUT/posttrain/data/eval.parquet``). Without one, verification and retrieval are reported as
not run, with the reason, and counting still runs.

Example::

    from spear.pipeline.evaluate_job import run_evaluate
    summary = run_evaluate("runs/demo/posttrain/model", "spear-demo/corpus", output="runs/eval-post")
    summary.attributes["comparisons"]["verification/eer"]["best"]
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from spear.cluster.storage import Storage, join_uri
from spear.evaluation.attributes import (Utterances, counting_eval_seed, evaluate_attributes, fbank_system,
                                         mean_pooled_system, posttrained_system, read_utterances,
                                         utterances_from_table, weight_free_targets)
from spear.evaluation.features import ProbedModels, released_names
from spear.evaluation.probes import L2_GRID
from spear.schemas import posttrain_export
from spear.schemas.posttrain_data import DATA_FILES
from spear.stages.artefacts import (RELEASE_FILES, fetch_checkpoint, is_posttrained_export, is_student_export,
                                    load_any_student, load_posttrained)
from spear.synthetic.counting import COUNTING_TASKS, CountingGenerator

#: The name of the input model's probe rows when it is a student export.
INPUT_LABEL = "input"


@dataclass(frozen=True)
class AttributeEvalSettings:
    """The attribute evaluation of a post-trained model (see the module docstring).

    ``eval_table``: a prepared evaluation table; ``eval_manifests``: held-out manifests (CSV/TSV/JSONL or
    Lhotse) read when no table is given; ``input_model``: the model post-training started from (default:
    the export's metadata); ``counting_per_class``: held-out synthetic clips per (task, count);
    ``n_bootstrap``: bootstrap resamples of every interval; ``text_encoder``: the transformers sentence
    encoder folder the semantic targets came from, when post-training used one (default: the export's
    metadata; without it speech -> text is not evaluated).
    """

    eval_table: Optional[str] = None
    eval_manifests: tuple[str, ...] = ()
    input_model: Optional[str] = None
    counting_per_class: int = 12
    n_bootstrap: int = 1000
    text_encoder: Optional[str] = None

    def __post_init__(self) -> None:
        if self.counting_per_class < 2:
            raise ValueError(f"counting_per_class must be >= 2 (half trains the probe, half tests), "
                             f"got {self.counting_per_class}")


def posttrained_config(student_dir: Optional[str], storage: Storage) -> Optional[dict[str, Any]]:
    """``posttrain.json`` of the post-trained export at ``student_dir`` (None: not one, or no folder)."""
    if not student_dir:
        return None
    try:
        local = fetch_checkpoint(str(student_dir), storage, patterns=posttrain_export.FILES)
    except FileNotFoundError:
        return None
    if not (local.is_dir() and is_posttrained_export(local)):
        return None
    return posttrain_export.decode_config((local / posttrain_export.CONFIG_FILE).read_text(), str(student_dir))


def input_model_of(config: dict[str, Any], override: Optional[str] = None) -> Optional[str]:
    """The input model's URI: ``override``, else what the export's metadata says post-training loaded."""
    meta = config.get("metadata", {})
    return override or meta.get("input_model_loaded_from") or meta.get("input_model") or None


def with_input_model(models: ProbedModels, input_model: Optional[str], storage: Storage
                     ) -> tuple[ProbedModels, Optional[str], Optional[str]]:
    """(the probed models with the input model added, its probe name, a note when it cannot be probed)."""
    if not input_model:
        return models, None, "the export names no input model: frame-level probes before post-training not run"
    try:
        local = fetch_checkpoint(str(input_model), storage, patterns=RELEASE_FILES)
    except (FileNotFoundError, ValueError) as exc:
        return models, None, f"input model {input_model} not found ({exc}): frame-level probes before not run"
    if local.is_dir() and is_student_export(local):
        return (replace(models, other_students=tuple(models.other_students) + ((INPUT_LABEL, str(input_model)),)),
                f"student:{INPUT_LABEL}", None)
    released = tuple(models.released) + (str(input_model),)
    return replace(models, released=released), released_names(released)[-1], None


def find_prepared(export_uri: str, split: str, storage: Storage) -> Optional[str]:
    """``OUTPUT/posttrain/data/<split>.parquet`` beside an export at ``OUTPUT/posttrain/model`` (None: absent)."""
    parent = posixpath.dirname(str(export_uri).rstrip("/"))
    if not parent:
        return None
    uri = join_uri(parent, "data", DATA_FILES[split])
    return uri if storage.exists(uri) else None


def mark_seen(utts: Utterances, train_uri: str, storage: Storage) -> int:
    """Mark which held-out utterances say a sentence of the training table (``sentence``, else ``pivot``):
    the prepared tables do not keep a manifest's ``seen_sentence``, the training rows say it exactly.
    Returns how many are marked seen."""
    from spear.stages.posttrain_data import read_prepared

    train = read_prepared(train_uri, storage, columns=["sentence", "pivot"])
    known = {s if s else p for s, p in zip(train["sentence"].to_pylist(), train["pivot"].to_pylist())} - {None, ""}
    utts.seen = [None if s is None else s in known for s in utts.column("sentence")]
    return sum(1 for v in utts.seen if v)


def load_eval_utterances(settings: AttributeEvalSettings, export_uri: str, storage: Storage,
                         log: Callable[[str], None]) -> tuple[Optional[Utterances], dict[str, Any]]:
    """(the held-out utterances or None, where they came from and what was set aside)."""
    if settings.eval_table:
        return read_utterances(settings.eval_table, storage), {"table": settings.eval_table}
    if settings.eval_manifests:
        # the post-training data's own reader and decoder (bad rows set aside with their reasons)
        from spear.stages.posttrain_data import decode_items, read_manifests

        items, bad, notes = read_manifests([], list(settings.eval_manifests), storage)
        table, rejected = decode_items(items, storage)
        bad = list(bad) + list(rejected)
        reasons: dict[str, int] = {}
        for q in bad:
            reasons[q["kind"]] = reasons.get(q["kind"], 0) + 1
        log(f"[evaluate] {table.num_rows} held-out utterances from {len(settings.eval_manifests)} manifest(s); "
            f"{len(bad)} set aside")
        return utterances_from_table(table), {"manifests": list(settings.eval_manifests), "set_aside": reasons,
                                              "label_notes": dict(notes)}
    found = find_prepared(export_uri, "eval", storage)
    if found:
        return read_utterances(found, storage), {"table": found}
    return None, {"not_found": "no evaluation table: give --eval-manifest (posttrain.eval_manifests) or post-train "
                               "with eval manifests"}


def evaluate_posttrained(export_uri: str, config: dict[str, Any], settings: AttributeEvalSettings, *,
                         input_model: Optional[str], corpus_root: Optional[str], storage: Storage,
                         device: torch.device, probe_seeds: Sequence[int] = (0, 1, 2),
                         l2_grid: Sequence[float] = L2_GRID, batch_seconds: float = 60.0,
                         others: Sequence[tuple[str, str]] = (),
                         log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The attribute evaluation of the post-trained export at ``export_uri`` (``config``: its
    ``posttrain.json``): a JSON-ready dict (:func:`spear.evaluation.attributes.evaluate_attributes`)
    plus ``data`` (where the held-out utterances came from) and ``notes``. ``others``: (label, export)
    pairs of further post-trained models evaluated beside it under their label (the demo's post-training
    without the counting tasks)."""
    notes: list[str] = []
    model = load_posttrained(export_uri, storage=storage, device=device)
    meta = config.get("metadata", {})
    systems = [posttrained_system(model)]
    for label, uri in others:  # further post-trained exports (e.g. trained without one attribute), side by side
        systems.append(posttrained_system(load_posttrained(uri, storage=storage, device=device), name=label))
    if input_model:
        try:
            systems.append(mean_pooled_system(load_any_student(input_model, storage=storage, device=device),
                                              name=INPUT_LABEL))
        except (FileNotFoundError, ValueError) as exc:
            notes.append(f"input model {input_model} not loaded ({exc}): no mean-pooled baseline")
    else:
        notes.append("the export names no input model: no mean-pooled baseline")
    systems.append(fbank_system(device=device))

    utts, source = load_eval_utterances(settings, export_uri, storage, log)
    if utts is None:
        notes.append(source["not_found"])
    elif utts.seen is None or all(v is None for v in utts.seen):
        train_uri = find_prepared(export_uri, "train", storage)
        if train_uri:
            source["seen"] = {"from": train_uri, "utterances": mark_seen(utts, train_uri, storage)}
    # semantic targets: the weight-free pivot embedding, unless training used a text encoder
    attr_info = meta.get("attributes", {}) if isinstance(meta.get("attributes"), dict) else {}
    semantic = [v for v in attr_info.values() if isinstance(v, dict) and v.get("kind") == "semantic"]
    text_targets: Optional[Callable[[Sequence[str], int], np.ndarray]] = weight_free_targets
    encoder_uri = None
    if any(v.get("targets") == "text_encoder" for v in semantic):
        encoder_uri = settings.text_encoder or next((v["text_encoder"] for v in semantic if v.get("text_encoder")),
                                                    None)
        if encoder_uri is None:
            text_targets = None
            notes.append("the semantic targets came from a text encoder that the export does not name: speech -> "
                         "text is not evaluated (give the encoder folder: posttrain.attributes[].text_encoder)")
        else:
            from spear.stages.text_targets import load_text_encoder  # transformers: only when configured

            encoder, _ = load_text_encoder(encoder_uri, storage, "text_encoder")
            text_targets = lambda texts, dim: encoder.encode(list(texts))  # noqa: E731 - its width is its own
    target_field = semantic[0].get("target_field", "pivot") if semantic else "pivot"

    counting = [s for s in model.attributes.values() if s.kind == "counting"]
    tasks = list(dict.fromkeys(t for s in counting for t in s.tasks)) or list(COUNTING_TASKS)
    clip = next((float(v["clip_seconds"]) for v in attr_info.values()
                 if isinstance(v, dict) and v.get("clip_seconds")), 2.0)
    seed = counting_eval_seed([int(meta.get("seed", 0))])
    items = CountingGenerator(tasks=tasks, seed=seed, duration=clip).balanced(settings.counting_per_class)
    log(f"[evaluate] attributes: {len(systems)} systems, {0 if utts is None else len(utts)} held-out utterances, "
        f"{len(items)} synthetic counting clips")
    res = evaluate_attributes(
        systems, utts, train_speakers=[str(s) for s in meta.get("speakers", [])], text_targets=text_targets,
        target_field=target_field, counting_items=items,
        counting_info={"seed": seed, "per_class": settings.counting_per_class, "clip_seconds": clip},
        corpus_root=corpus_root, storage=storage, probe_seeds=probe_seeds, l2_grid=l2_grid,
        n_bootstrap=settings.n_bootstrap, batch_seconds=batch_seconds, log=log)
    res.setdefault("data", {}).update(source=source)
    res["model"] = {"export": str(export_uri), "input_model": input_model, "text_encoder": encoder_uri,
                    "attributes": {n: s.kind for n, s in model.attributes.items()}, "step": meta.get("step")}
    res["notes"] = notes
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res

