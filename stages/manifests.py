"""Labelled manifests (CSV / TSV with a header, JSONL): reading their rows and resolving their audio paths.

One reader for every user manifest of the pipeline: the probe tasks of `spear evaluate`
(:func:`spear.evaluation.tasks.load_manifest_task`) and the post-training data
(:mod:`spear.stages.posttrain_data`). A Lhotse CutSet manifest is told apart by its content
(:func:`is_lhotse_manifest`) and parsed by Lhotse elsewhere (:mod:`spear.stages.lhotse_source`).

Each row comes back with its line number in the file (CSV: the header is line 1), so a message
or a quarantine record can point at it. Audio paths that are neither absolute nor URIs are
relative to the manifest's folder (:func:`resolve_manifest_path`), wherever the run starts.

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "m.csv")
    >>> _ = open(p, "w").write("audio,speaker\\na.wav,s1\\n")
    >>> from spear.cluster.storage import Storage
    >>> read_manifest_rows(p, Storage())
    [(2, {'audio': 'a.wav', 'speaker': 's1'})]
    >>> read_manifest_rows("m.tsv", Storage(), text="\\ufeffaudio\\tlabel\\nb.flac\\tx\\n")
    [(2, {'audio': 'b.flac', 'label': 'x'})]
    >>> resolve_manifest_path(p, "a.wav") == os.path.join(d, "a.wav")
    True
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Any, Callable, Optional

from spear.cluster.storage import Storage, is_absolute_uri, join_uri, normalize_uri

#: Suffixes of the labelled manifests read here (``.json`` and ``.ndjson`` are read as JSONL).
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".ndjson")

# The keys a Lhotse cut has at its top level and a labelled row does not.
_LHOTSE_CUT_TYPES = {"MonoCut", "MultiCut", "MixedCut", "PaddingCut", "DataCut"}


def manifest_kind(uri: str) -> str:
    """``csv``, ``tsv`` or ``jsonl`` from the file name; ValueError for anything else.

    >>> manifest_kind("s3://b/m.TSV"), manifest_kind("rows.ndjson")
    ('tsv', 'jsonl')
    """
    lower = uri.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".tsv"):
        return "tsv"
    raise ValueError(f"{uri}: a manifest must be .csv, .tsv or .jsonl")


def is_lhotse_manifest(uri: str, head: Optional[str] = None) -> bool:
    """Whether ``uri`` is a Lhotse CutSet manifest rather than a labelled table: gzipped or YAML by its name, else
    by its first line (``head``): a JSON array, or an object with a cut ``type`` or ``recording``/``supervisions``.

    >>> is_lhotse_manifest("cuts.jsonl.gz"), is_lhotse_manifest("m.jsonl", '{"audio": "a.wav"}')
    (True, False)
    >>> is_lhotse_manifest("m.jsonl", '{"id": "c1", "type": "MonoCut", "start": 0}')
    True
    """
    lower = uri.lower()
    if lower.endswith((".gz", ".yaml", ".yml")):
        return True
    if not lower.endswith((".jsonl", ".json", ".ndjson")) or head is None:
        return False
    line = head.lstrip()
    if line.startswith("["):
        return True
    try:
        first = json.loads(line.splitlines()[0]) if line else None
    except ValueError:
        return False
    return isinstance(first, dict) and (first.get("type") in _LHOTSE_CUT_TYPES
                                        or ("recording" in first and "supervisions" in first))


def read_manifest_rows(uri: str, storage: Storage, *, text: Optional[str] = None,
                       bad_line: Optional[Callable[[int, str], None]] = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every row of a CSV / TSV (with a header) or JSONL manifest.

    ``text``: the manifest's contents when already read. A JSONL line that is not a JSON object raises
    ValueError naming the file and line, or, with ``bad_line``, is handed to ``bad_line(line, reason)`` and
    skipped (the other rows are still read). Blank JSONL lines are skipped.
    """
    kind = manifest_kind(uri)
    if text is None:
        text = storage.read_text(uri)
    text = text.removeprefix("\ufeff")   # a byte-order mark (spreadsheet exports) is not part of the first name
    rows: list[tuple[int, dict[str, Any]]] = []
    if kind == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as exc:
                reason = f"line {n} is not a JSON object ({exc})"
                if bad_line is None:
                    raise ValueError(f"{uri}: {reason}") from None
                bad_line(n, reason)
                continue
            rows.append((n, row))
        return rows
    reader = csv.DictReader(io.StringIO(text), dialect="excel-tab" if kind == "tsv" else "excel")
    for row in reader:
        rows.append((reader.line_num, row))
    return rows


def manifest_folder(uri: str) -> str:
    """The folder relative audio paths of manifest ``uri`` are resolved against (absolute, any working directory)."""
    uri = normalize_uri(uri)
    return posixpath.dirname(uri) if "://" in uri else os.path.dirname(uri)


def resolve_manifest_path(manifest_uri: str, path: str) -> str:
    """A manifest's audio ``path`` as a URI to read: absolute paths, ``~`` and URIs as given (``~`` expanded),
    relative ones against the manifest's folder."""
    path = str(path)
    if is_absolute_uri(path):
        return normalize_uri(path)
    return normalize_uri(join_uri(manifest_folder(manifest_uri), *path.replace("\\", "/").split("/")))
