"""Quarantine records: source objects set aside, with the stage and the reason.

One record per object that could not be listed, read, decoded or run through a teacher. It
travels from the stage that set the object aside to the job as a :class:`QuarantineRecord`
(a plain dict, so it crosses Ray and JSON unchanged) and is stored by `spear decode` as
``OUTPUT/quarantine.parquet`` (:data:`QUARANTINE_SCHEMA`); `spear tokenize` records it as a
``quarantined`` ledger entry instead (:mod:`spear.schemas.ledger`).

A damaged object whose decodable start was kept is *partial*: its segments go on as usual and
one record notes what was lost, with a reason that starts with :data:`PARTIAL_PREFIX`
(:func:`partial_reason`, :func:`is_partial`).

Example::

    >>> q = quarantine_record({"uri": "/c/a.wav", "source": "c", "domain": "speech", "etag": "1-2"}, "read",
    ...                       "object vanished between listing and reading")
    >>> q["stage"], is_partial(q)
    ('read', False)
    >>> quarantine_table([q]).num_rows
    1
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, TypedDict

import pyarrow as pa

QUARANTINE_SCHEMA_VERSION = 2   # 2: kept_seconds (partial objects)

QUARANTINE_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),   # "catalog" | "read" | "decode" | ...
    pa.field("reason", pa.string(), nullable=False),  # "partial: kept ..." when the decodable part was kept
    pa.field("kept_seconds", pa.float64(), nullable=True),  # seconds kept of a partial object; null when none
], metadata={b"spear.schema": b"quarantine", b"spear.version": str(QUARANTINE_SCHEMA_VERSION).encode()})


class QuarantineRecord(TypedDict, total=False):
    """One object set aside. ``uri``, ``source``, ``domain``, ``etag``, ``stage`` and ``reason`` are always
    there; ``size`` once the object was listed, ``kept_seconds`` on a partial object's stored record."""

    uri: str
    source: str
    domain: str
    etag: str
    size: int
    stage: str
    reason: str
    kept_seconds: Optional[float]


def quarantine_record(obj: Mapping[str, Any], stage: str, reason: str) -> QuarantineRecord:
    """The record of catalog object ``obj`` (``uri``, ``source``, ``domain``, ``etag``, optionally ``size``)."""
    q = QuarantineRecord(uri=obj["uri"], source=obj["source"], domain=obj["domain"], etag=obj["etag"])
    if "size" in obj:
        q["size"] = obj["size"]
    q["stage"], q["reason"] = stage, reason
    return q


def quarantine_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Records as a :data:`QUARANTINE_SCHEMA` table (fields it has no column for, like ``size``, are left out)."""
    return pa.Table.from_pylist(list(records), schema=QUARANTINE_SCHEMA)


PARTIAL_PREFIX = "partial: "


def partial_reason(kept_seconds: float, declared_seconds: float | None, cause: str) -> str:
    """The quarantine reason of an object whose decodable part was kept.

    >>> partial_reason(3.2, 6.4, "truncated: 51200 of 102400 frames present")
    'partial: kept 3.2 s of ~6.4 s: truncated: 51200 of 102400 frames present'
    """
    whole = f"of ~{declared_seconds:.1f} s" if declared_seconds else "(whole length unknown)"
    return f"{PARTIAL_PREFIX}kept {kept_seconds:.1f} s {whole}: {cause}"


def is_partial(quarantine: Mapping[str, Any]) -> bool:
    """Whether a quarantine record notes a partly kept object (its kept segments are committed as usual)."""
    return quarantine.get("stage") == "decode" and str(quarantine.get("reason") or "").startswith(PARTIAL_PREFIX)
