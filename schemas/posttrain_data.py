"""Post-training data: the prepared utterance tables, their quarantine, the reuse record and the text-target cache.

`spear posttrain` reads labelled manifests once into two Parquet tables under ``OUTPUT/posttrain/data/``
(:data:`DATA_FILES`), one row per usable utterance (:data:`POSTTRAIN_UTTERANCE_SCHEMA`): the audio as
16 kHz mono FLAC bytes beside its labels. Rows that cannot be used are set aside, one JSON line each, in
``quarantine.jsonl`` (:func:`quarantine_row`: the manifest, its line, the id, the audio, the stage and a
one-line reason, like the catalog's :mod:`spear.schemas.quarantine` records). ``prepared.json``
(:func:`prepared_record`) names the manifests the tables were made from (with sizes and etags), so a
resumed run reuses them instead of decoding again. ``targets-<attr>.npy`` + ``.json``
(:func:`targets_record`) cache a semantic attribute's sentence embeddings, one row per distinct text.

Example::

    >>> t = utterance_table([{"utt_id": "u1", "split": "train", "audio": b"fLaC", "num_samples": 16000,
    ...                       "speaker": "s1", "source": "/m.csv", "row": 2}])
    >>> t.num_rows, t["language"].to_pylist()
    (1, [None])
    >>> check_utterance_table(t, "train.parquet").schema.metadata[b"spear.schema"]
    b'posttrain_utterances'
    >>> quarantine_row("/m.csv", 3, "u2", "/a.wav", "read", "missing audio", "no such file /a.wav")["kind"]
    'missing audio'
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Optional, TypedDict

import pyarrow as pa

from spear.schemas.versioning import FormatError, check_kind, check_version, parse_json_object

POSTTRAIN_DATA_VERSION = 1

#: The splits of the prepared data: train manifests' rows and eval manifests' rows.
SPLITS = ("train", "eval")

#: File names under ``OUTPUT/posttrain/data/``.
DATA_FILES = {"train": "train.parquet", "eval": "eval.parquet"}
QUARANTINE_FILE = "quarantine.jsonl"
PREPARED_FILE = "prepared.json"

POSTTRAIN_UTTERANCE_SCHEMA = pa.schema([
    pa.field("utt_id", pa.string(), nullable=False),      # unique over both splits
    pa.field("split", pa.string(), nullable=False),       # "train" | "eval"
    pa.field("audio", pa.binary(), nullable=False),       # FLAC, PCM_16, mono, 16 kHz (stages.audio.flac_encode)
    pa.field("num_samples", pa.int64(), nullable=False),  # at 16 kHz
    pa.field("speaker", pa.string()),                     # null: not used for speaker attributes
    pa.field("language", pa.string()),
    pa.field("text", pa.string()),                        # transcript; null: none (or empty)
    pa.field("pivot", pa.string()),                       # translation into the pivot language
    pa.field("sentence", pa.string()),                    # translations of one sentence share it (default: pivot)
    pa.field("source", pa.string(), nullable=False),      # the manifest's URI
    pa.field("row", pa.int64(), nullable=False),          # the row's line in it (CSV: header = 1; Lhotse: cut number)
], metadata={b"spear.schema": b"posttrain_utterances", b"spear.version": str(POSTTRAIN_DATA_VERSION).encode()})

#: The label columns (nullable strings) of a prepared row.
LABEL_COLUMNS = ("speaker", "language", "text", "pivot", "sentence")


def utterance_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with the schema's columns; missing labels are null) as a :data:`POSTTRAIN_UTTERANCE_SCHEMA`
    table. ValueError names the first row with an unknown split."""
    rows = list(rows)
    for r in rows:
        if r.get("split") not in SPLITS:
            raise ValueError(f"utterance {r.get('utt_id')!r}: split must be one of {SPLITS}, got {r.get('split')!r}")
    names = POSTTRAIN_UTTERANCE_SCHEMA.names
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=POSTTRAIN_UTTERANCE_SCHEMA)


def check_utterance_table(table: pa.Table, what: str) -> pa.Table:
    """``table`` when it is a prepared utterance table this spear reads (cast to the current schema: the field
    order and nullability); :class:`FormatError` naming ``what`` when it is another table or a newer version."""
    meta = table.schema.metadata or {}
    kind = meta.get(b"spear.schema", b"").decode(errors="replace")
    if kind != "posttrain_utterances":
        raise FormatError(f"{what} is not a prepared post-training table (schema {kind or 'unnamed'!r}): "
                          "delete it and run `spear posttrain` again to prepare the data")
    check_version(what, meta.get(b"spear.version", b"").decode(errors="replace"), POSTTRAIN_DATA_VERSION)
    missing = [n for n in POSTTRAIN_UTTERANCE_SCHEMA.names if n not in table.column_names]
    if missing:
        raise FormatError(f"{what} lacks the column(s) {', '.join(missing)}")
    try:
        return table.select(POSTTRAIN_UTTERANCE_SCHEMA.names).cast(POSTTRAIN_UTTERANCE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise FormatError(f"{what} has columns of other types than a prepared table: {exc}") from None


# --------------------------------------------------------------------------- quarantine


class QuarantineRow(TypedDict):
    """One manifest row set aside: where it is (``manifest``, ``row``), what it named (``id``, ``audio``; None
    when the row did not get that far), the ``stage`` (``manifest`` | ``read`` | ``decode``), the ``kind`` of
    problem (counted in summaries: "missing audio", "duplicate id", ...) and the one-line ``reason``."""

    manifest: str
    row: Optional[int]
    id: Optional[str]
    audio: Optional[str]
    stage: str
    kind: str
    reason: str


QUARANTINE_STAGES = ("manifest", "read", "decode")


def quarantine_row(manifest: str, row: Optional[int], utt_id: Optional[str], audio: Optional[str], stage: str,
                   kind: str, reason: str) -> QuarantineRow:
    """A :class:`QuarantineRow`; ValueError for an unknown stage or a reason over several lines."""
    if stage not in QUARANTINE_STAGES:
        raise ValueError(f"stage must be one of {QUARANTINE_STAGES}, got {stage!r}")
    return QuarantineRow(manifest=manifest, row=row, id=utt_id, audio=audio, stage=stage, kind=kind,
                         reason=" ".join(str(reason).split()))


def quarantine_jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    """``quarantine.jsonl``'s text: one JSON object per line."""
    return "".join(json.dumps(dict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def parse_quarantine_jsonl(text: str, what: str) -> list[QuarantineRow]:
    """The rows of a ``quarantine.jsonl``; FormatError naming ``what`` and the line for a line that is not one."""
    out: list[QuarantineRow] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json_object(f"{what} line {n}", line)
        if not {"manifest", "stage", "kind", "reason"} <= row.keys():
            raise FormatError(f"{what} line {n} is not a post-training quarantine row")
        out.append(QuarantineRow(**{k: row.get(k) for k in QuarantineRow.__annotations__}))
    return out


def count_by(values: Iterable[str]) -> dict[str, int]:
    """How often each value occurs, most frequent first (ties by name).

    >>> count_by(["b", "a", "b"])
    {'b': 2, 'a': 1}
    """
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------- the reuse record


def prepared_record(manifests: list[Mapping[str, Any]], settings: Mapping[str, Any],
                    summary: Mapping[str, Any]) -> dict[str, Any]:
    """``prepared.json``: the manifests the tables were made from (``uri``, ``split``, ``size``, ``etag`` each),
    the preparation ``settings`` and the ``summary`` a reusing run reports."""
    return {"kind": "posttrain-prepared", "version": POSTTRAIN_DATA_VERSION, "manifests": [dict(m) for m in manifests],
            "settings": dict(settings), "summary": dict(summary)}


def parse_prepared_record(text: str, what: str) -> dict[str, Any]:
    """A ``prepared.json`` record; FormatError naming ``what`` for another file or a newer version."""
    rec = parse_json_object(what, text)
    check_kind(what, rec.get("kind"), "posttrain-prepared")
    check_version(what, rec.get("version"), POSTTRAIN_DATA_VERSION)
    for key in ("manifests", "settings", "summary"):
        if key not in rec:
            raise FormatError(f"{what} lacks {key!r}")
    return rec


# --------------------------------------------------------------------------- text-target cache

TEXT_TARGETS_VERSION = 1


def targets_files(attribute: str) -> tuple[str, str]:
    """The cache files of semantic attribute ``attribute``: (vectors ``.npy``, record ``.json``).

    >>> targets_files("semantic")
    ('targets-semantic.npy', 'targets-semantic.json')
    """
    return f"targets-{attribute}.npy", f"targets-{attribute}.json"


def text_key(text: str) -> str:
    """The hash a cached target is keyed by (sha256 of the UTF-8 text, 16 bytes in hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def targets_record(encoder: str, dim: int, texts: list[str]) -> dict[str, Any]:
    """``targets-<attr>.json``: the ``encoder``'s identity, the vectors' ``dim`` and per row of the ``.npy`` the
    :func:`text_key` of its text (and the text, for people reading it)."""
    return {"kind": "posttrain-text-targets", "version": TEXT_TARGETS_VERSION, "encoder": encoder, "dim": int(dim),
            "keys": [text_key(t) for t in texts], "texts": list(texts)}


def parse_targets_record(text: str, what: str) -> dict[str, Any]:
    """A ``targets-<attr>.json`` record; FormatError naming ``what`` for another file or a newer version."""
    rec = parse_json_object(what, text)
    check_kind(what, rec.get("kind"), "posttrain-text-targets")
    check_version(what, rec.get("version"), TEXT_TARGETS_VERSION)
    if not isinstance(rec.get("keys"), list) or not isinstance(rec.get("encoder"), str):
        raise FormatError(f"{what} lacks its keys or encoder")
    return rec
