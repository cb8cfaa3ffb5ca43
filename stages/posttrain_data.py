"""Post-training data: labelled manifests read, checked, decoded on Ray and written as two prepared tables.

`spear posttrain` calls :func:`prepare_posttrain_data` once at the start of a run. It reads every
train and eval manifest, sets aside the rows it cannot use (``quarantine.jsonl``, one line each with
the manifest, the line, the id, the audio, the stage and a one-line reason; the run goes on),
decodes the rest in Ray tasks of :data:`ROWS_PER_TASK` rows to 16 kHz mono and writes
``train.parquet`` / ``eval.parquet`` (:data:`~spear.schemas.posttrain_data.POSTTRAIN_UTTERANCE_SCHEMA`)
under ``data_uri``. ``prepared.json``, written last, names the manifests with their sizes and etags:
a resumed run whose manifests are unchanged reuses the tables without starting Ray.

Manifests:

- **CSV / TSV** (with a header) or **JSONL** (:mod:`spear.stages.manifests`): ``audio`` (also ``uri``,
  ``path``; relative to the manifest's folder; local, ``~`` or s3://), optional ``id``, ``start`` and
  ``duration`` (seconds), ``channel``, ``speaker``, ``language``, ``text``, ``pivot``, ``sentence``;
- **Lhotse CutSets** (``cuts.jsonl.gz`` ...: parsed by Lhotse, :mod:`spear.stages.lhotse_source`): the cut's
  id, range and channels of its recording, its first supervision's speaker and language, the supervisions'
  texts, and ``pivot`` / ``sentence`` from the supervision's or the cut's ``custom`` fields.

Set aside (quarantined): a row without audio, with a bad start, duration or channel, a duplicate id (the
first row keeps it, over all manifests, train first), a row with no label at all (no speaker, text or
pivot), a cut Lhotse cannot hand over as one range of one recording; then at decoding a missing or
unreadable file, corrupt or empty audio, a start past the end and audio shorter than :data:`MIN_SECONDS`.
Kept with a note (counted in :attr:`PreparedData.label_notes`): an empty transcript (not used for
semantic attributes) and a missing speaker (not used for speaker attributes).

Example::

    from spear.cluster.storage import Storage
    from spear.stages.posttrain_data import prepare_posttrain_data, read_prepared

    prepared = prepare_posttrain_data(["corpus/train.jsonl"], ["corpus/eval.jsonl"], "out/posttrain/data",
                                      Storage())
    print(prepared.human())
    table = read_prepared(prepared.train_uri, Storage())
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.cluster.console import console_log
from spear.cluster.ray_runtime import ray_session
from spear.cluster.storage import Storage, StorageError, join_uri, normalize_uri, split_uri
from spear.config import ConfigError
from spear.schemas.posttrain_data import (DATA_FILES, POSTTRAIN_DATA_VERSION, POSTTRAIN_UTTERANCE_SCHEMA,
                                          PREPARED_FILE, QUARANTINE_FILE, QuarantineRow, check_utterance_table,
                                          count_by, parse_prepared_record, prepared_record, quarantine_jsonl,
                                          quarantine_row, utterance_table)
from spear.schemas.segments import SAMPLE_RATE
from spear.schemas.versioning import FormatError
from spear.stages.audio import AudioDecodeError, decode_segments, flac_encode, read_cut_audio
from spear.stages.lhotse_source import LocalCopies, cut_row, iter_manifest_cuts
from spear.stages.manifests import is_lhotse_manifest, read_manifest_rows, resolve_manifest_path
from spear.stages.writer import parquet_bytes

#: Utterances shorter than this are set aside (too short for an utterance embedding).
MIN_SECONDS = 0.2

#: Manifest rows decoded per Ray task (a recording's rows that follow each other are read once).
ROWS_PER_TASK = 32

#: The label notes of rows kept without some label.
NOTE_EMPTY_TEXT = "empty transcript: not used for semantic attributes"
NOTE_NO_TEXT = "no text or pivot: not used for semantic attributes"
NOTE_NO_SPEAKER = "no speaker: not used for speaker attributes"

_WORD = re.compile(r"\w")


class PostTrainDataError(ValueError):
    """Prepared data that cannot be used (no usable training row, a table of another kind); one line."""


@dataclass(frozen=True)
class PreparedData:
    """What :func:`prepare_posttrain_data` prepared (or found prepared, ``reused``).

    ``rows`` / ``seconds`` / ``speakers`` / ``languages``: per split (``train``, ``eval``); speakers and
    languages are the sorted distinct values. ``quarantine_reasons``: rows set aside per kind of problem;
    ``label_notes``: rows kept without a label per note. ``eval_uri`` is None without eval manifests.
    """

    data_uri: str
    train_uri: str
    eval_uri: Optional[str]
    quarantine_uri: str
    rows: dict[str, int]
    seconds: dict[str, float]
    speakers: dict[str, list[str]]
    languages: dict[str, list[str]]
    quarantined: int
    quarantine_reasons: dict[str, int]
    label_notes: dict[str, int] = field(default_factory=dict)
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        """A few lines for people."""
        head = "post-training data (reused: manifests unchanged)" if self.reused else "post-training data"
        lines = [f"{head} under {self.data_uri}"]
        for split in ("train", "eval"):
            if split == "eval" and self.eval_uri is None:
                continue
            lines.append(f"  {split}: {self.rows.get(split, 0)} utterances, {self.seconds.get(split, 0.0) / 60:.1f} min,"
                         f" {len(self.speakers.get(split, []))} speakers, languages "
                         f"{', '.join(self.languages.get(split, [])) or '-'}")
        if self.quarantined:
            why = "; ".join(f"{k}: {v}" for k, v in self.quarantine_reasons.items())
            lines.append(f"  set aside: {self.quarantined} rows ({why}), see {self.quarantine_uri}")
        for note, n in self.label_notes.items():
            lines.append(f"  {n} rows kept with {note}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading manifests


def _label(value: Any) -> Optional[str]:
    """A label as text; None for a missing, null, NaN or blank one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _number(row: dict, key: str) -> Optional[float]:
    """``row[key]`` as a finite float (None when absent or blank); ValueError naming it otherwise."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{key} {value!r} is not a finite number")
    return x


class _Reader:
    """Turns manifests into utterance items (plain dicts) and quarantine rows, checking ids over all of them."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.items: list[dict[str, Any]] = []
        self.bad: list[QuarantineRow] = []
        self.notes: list[str] = []
        self.seen: dict[str, tuple[str, int]] = {}  # id -> (manifest, row) of the row that has it

    def reject(self, manifest: str, row: Optional[int], utt_id: Optional[str], audio: Optional[str], kind: str,
               reason: str, stage: str = "manifest") -> None:
        self.bad.append(quarantine_row(manifest, row, utt_id, audio, stage, kind, reason))

    def add(self, item: dict[str, Any], text_given: bool) -> None:
        """Check one item's id and labels, then keep it (or set it aside)."""
        where = (item["source"], item["row"], item["utt_id"], item["audio"])
        first = self.seen.get(item["utt_id"])
        if first is not None:
            self.reject(*where, "duplicate id", f"id {item['utt_id']!r} is already used by {first[0]} row {first[1]}")
            return
        if item["pivot"] is not None and not _WORD.search(item["pivot"]):
            item["pivot"] = None   # punctuation only: nothing a sentence embedding could say
        if item["speaker"] is None and item["text"] is None and item["pivot"] is None:
            self.reject(*where, "no label", "no speaker, text or pivot: nothing to post-train on")
            return
        self.seen[item["utt_id"]] = (item["source"], item["row"])
        notes = item["notes"] = []
        if item["speaker"] is None:
            notes.append(NOTE_NO_SPEAKER)
        if text_given and item["text"] is None:
            notes.append(NOTE_EMPTY_TEXT)
        elif item["text"] is None and item["pivot"] is None:
            notes.append(NOTE_NO_TEXT)
        self.notes.extend(notes)
        if item["sentence"] is None:
            item["sentence"] = item["pivot"]
        self.items.append(item)

    def table_manifest(self, uri: str, text: str, split: str) -> None:
        rows = read_manifest_rows(uri, self.storage, text=text,
                                  bad_line=lambda n, why: self.reject(uri, n, None, None, "bad manifest row", why))
        for n, row in rows:
            audio = _label(row.get("audio")) or _label(row.get("uri")) or _label(row.get("path"))
            if audio is None:
                self.reject(uri, n, _label(row.get("id")), None, "no audio", "the row has no audio (or uri, path) field")
                continue
            try:
                resolved = resolve_manifest_path(uri, audio)
            except StorageError as exc:
                self.reject(uri, n, _label(row.get("id")), audio, "unreadable audio", str(exc))
                continue
            try:
                start, duration = _number(row, "start"), _number(row, "duration")
                if start is not None and start < 0:
                    raise ValueError(f"start {start:g} is negative")
                if duration is not None and duration <= 0:
                    raise ValueError(f"duration {duration:g} is not positive")
            except ValueError as exc:
                self.reject(uri, n, _label(row.get("id")), resolved, "bad start/duration", str(exc))
                continue
            channel = _label(row.get("channel"))
            if channel is not None and not channel.isdigit():
                self.reject(uri, n, _label(row.get("id")), resolved, "bad channel",
                            f"channel {channel!r} is not a channel number (0, 1, ...)")
                continue
            utt_id = _label(row.get("id")) or resolved + (f"@{start:g}" if start is not None else "") \
                + (f"#{channel}" if channel is not None else "")
            raw_text = row.get("text")
            text = _label(raw_text)
            if text is not None and not _WORD.search(text):
                text = None  # punctuation only: nothing a sentence embedding could say
            self.add({"utt_id": utt_id, "split": split, "audio": resolved, "start": start, "duration": duration,
                      "channels": [int(channel)] if channel is not None else None,
                      "speaker": _label(row.get("speaker")), "language": _label(row.get("language")), "text": text,
                      "pivot": _label(row.get("pivot")), "sentence": _label(row.get("sentence")), "source": uri,
                      "row": n}, text_given=raw_text is not None)

    def lhotse_manifest(self, uri: str, split: str, field_name: str) -> None:
        from lhotse.cut import MonoCut, MultiCut  # Lhotse is needed only for a Lhotse manifest

        copies = LocalCopies(capacity=1)
        resolved: dict = {}
        n_items, n_bad, n_notes = len(self.items), len(self.bad), len(self.notes)
        seen = dict(self.seen)
        try:
            for n, cut in enumerate(iter_manifest_cuts(copies.path(uri, self.storage), shar=False), 1):
                try:
                    cid, audio, _, _, start, duration, channels, speaker, language, text = cut_row(
                        cut, uri, None, (MonoCut, MultiCut), resolved)
                except (ValueError, AttributeError) as exc:
                    self.reject(uri, n, getattr(cut, "id", None), None, "unsupported cut", str(exc))
                    continue
                custom = dict(getattr(cut, "custom", None) or {})
                sups = getattr(cut, "supervisions", None) or []
                if sups and getattr(sups[0], "custom", None):
                    custom.update(sups[0].custom)
                text_given = any(s.text is not None for s in sups)
                if text is not None and not _WORD.search(text):
                    text = None
                self.add({"utt_id": cid, "split": split, "audio": audio, "start": start, "duration": duration,
                          "channels": channels, "speaker": _label(speaker), "language": _label(language),
                          "text": _label(text), "pivot": _label(custom.get("pivot")),
                          "sentence": _label(custom.get("sentence")), "source": uri, "row": n}, text_given=text_given)
        except (FileNotFoundError, StorageError) as exc:
            raise ConfigError(f"{field_name}: cannot read {uri}: {exc}") from None
        except Exception as exc:  # whatever Lhotse raises on a file that is not a CutSet manifest
            del self.items[n_items:], self.bad[n_bad:], self.notes[n_notes:]
            self.seen = seen
            raise ConfigError(f"{field_name}: {uri} is not a Lhotse CutSet manifest "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
        finally:
            copies.close()

    def manifest(self, uri: str, split: str, field_name: str) -> None:
        lower = uri.lower()
        if lower.endswith((".gz", ".yaml", ".yml")):
            self.lhotse_manifest(uri, split, field_name)
            return
        if not lower.endswith((".csv", ".tsv", ".jsonl", ".json", ".ndjson")):
            raise ConfigError(f"{field_name}: {uri} is not a manifest (.csv, .tsv, .jsonl or a Lhotse CutSet "
                              "such as cuts.jsonl.gz)")
        try:
            text = self.storage.read_text(uri)
        except FileNotFoundError:
            raise ConfigError(f"{field_name}: {uri} does not exist") from None
        except (StorageError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{field_name}: cannot read {uri}: {exc}") from None
        if is_lhotse_manifest(uri, text[:4096]):
            self.lhotse_manifest(uri, split, field_name)
        else:
            self.table_manifest(uri, text, split)


def read_manifests(train_manifests: Sequence[str], eval_manifests: Sequence[str], storage: Storage
                   ) -> tuple[list[dict[str, Any]], list[QuarantineRow], dict[str, int]]:
    """(utterance items to decode, rows set aside, label notes counted) of every manifest, train ones first.

    An item is a dict: ``utt_id``, ``split``, ``audio`` (a URI to read), ``start``, ``duration`` (None: to the
    end), ``channels`` (positions to average; None: all), the labels, ``source``, ``row`` and its label
    ``notes``; the notes are counted over every item read. A manifest that
    is missing or cannot be parsed at all is a :class:`ConfigError` naming its ``posttrain.*_manifests`` entry.
    """
    reader = _Reader(storage)
    for split, field_name, uris in (("train", "posttrain.train_manifests", train_manifests),
                                    ("eval", "posttrain.eval_manifests", eval_manifests)):
        for i, uri in enumerate(uris):
            try:
                norm = normalize_uri(uri)
            except StorageError as exc:
                raise ConfigError(f"{field_name}[{i}]: {exc}") from None
            reader.manifest(norm, split, f"{field_name}[{i}]")
    return reader.items, reader.bad, count_by(reader.notes)


# --------------------------------------------------------------------------- decoding


def _decode_kind(reason: str) -> str:
    if reason.startswith("offset past the end"):
        return "offset past end"
    if reason.startswith(("empty object", "zero-length")):
        return "empty audio"
    if reason.startswith("the cut ends at"):
        return "bad start/duration"
    if reason.startswith("the cut asks for channel"):
        return "bad channel"
    return "corrupt audio"


def _decode_item(item: dict[str, Any], audio: str | bytes) -> np.ndarray:
    """One item's 16 kHz mono int16 samples from its recording (a local path or the encoded bytes)."""
    if item["start"] is None and item["duration"] is None and item["channels"] is None:
        if isinstance(audio, bytes):
            data = audio
        else:
            with open(audio, "rb") as f:
                data = f.read()
        # The whole file as one piece: decode_segments checks truncation and damage as the decode stage does.
        _, segments = decode_segments(data, target_rate=SAMPLE_RATE, max_segment_seconds=1e7)
        return np.concatenate([pcm for _, pcm in segments]) if segments else np.zeros(0, np.int16)
    start = item["start"] or 0.0
    duration = item["duration"]
    if duration is None:
        import soundfile as sf

        try:
            info = sf.info(io.BytesIO(audio) if isinstance(audio, bytes) else audio)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise AudioDecodeError(f"unsupported or corrupt audio: {exc}") from None
        duration = max(info.frames / info.samplerate - start, 0.0)
    return read_cut_audio(audio, start, duration, item["channels"], target_rate=SAMPLE_RATE)[1]


def decode_items(items: Sequence[dict[str, Any]], storage: Storage) -> tuple[pa.Table, list[QuarantineRow]]:
    """Decode the items of one task (each recording read once): their prepared rows and the ones set aside."""
    good: list[dict[str, Any]] = []
    bad: list[QuarantineRow] = []

    def reject(item: dict, stage: str, kind: str, reason: str) -> None:
        bad.append(quarantine_row(item["source"], item["row"], item["utt_id"], item["audio"], stage, kind, reason))

    order = {id(item): k for k, item in enumerate(items)}
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item["audio"], []).append(item)
    for uri, group in groups.items():
        try:
            scheme, path = split_uri(uri)
            if scheme == "file":
                if not os.path.isfile(path):
                    raise FileNotFoundError(path)
                audio: str | bytes = path   # soundfile seeks in a local file: a range reads only that range
            else:
                audio = storage.read_bytes(uri)
        except FileNotFoundError:
            for item in group:
                reject(item, "read", "missing audio", f"audio file missing: {uri}")
            continue
        except Exception as exc:  # storage errors: one line each
            for item in group:
                reject(item, "read", "unreadable audio", f"cannot read {uri}: {type(exc).__name__}: {exc}")
            continue
        for item in group:
            try:
                pcm = _decode_item(item, audio)
            except AudioDecodeError as exc:
                reject(item, "decode", _decode_kind(exc.reason), exc.reason)
                continue
            except OSError as exc:
                reject(item, "read", "unreadable audio", f"cannot read {uri}: {exc}")
                continue
            if pcm.size < MIN_SECONDS * SAMPLE_RATE:
                reject(item, "decode", "too short",
                       f"{pcm.size / SAMPLE_RATE:.3f} s of audio, shorter than {MIN_SECONDS:g} s")
                continue
            good.append({**item, "audio": flac_encode(pcm, SAMPLE_RATE), "num_samples": int(pcm.size),
                         "_order": order[id(item)]})
    good.sort(key=lambda row: row["_order"])   # the items' order, not the recordings'
    return utterance_table(good), bad


def _blocks(items: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _decode_on_ray(items: list[dict[str, Any]], storage: Storage, say: Callable[[str], None]
                   ) -> tuple[dict[str, list[pa.Table]], list[QuarantineRow]]:
    """Decode every item in Ray tasks (a bounded number in flight); tables per split in item order."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(decode_items)
    blocks = _blocks(items, ROWS_PER_TASK)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    tables: dict[str, list[pa.Table]] = {"train": [], "eval": []}
    bad: list[QuarantineRow] = []
    storage_ref = ray.put(storage)
    done_rows, last = 0, time.monotonic()
    nxt = 0
    while nxt < len(blocks) or pending:
        while nxt < len(blocks) and len(pending) < window:
            pending.append(remote.remote(blocks[nxt], storage_ref))
            nxt += 1
        table, rejected = ray.get(pending.pop(0))   # in order: the tables keep the manifests' row order
        for split in tables:
            part = table.filter(pc.equal(table["split"], split))
            if part.num_rows:
                tables[split].append(part)
        bad.extend(rejected)
        done_rows += table.num_rows + len(rejected)
        if time.monotonic() - last > 2.0:
            last = time.monotonic()
            say(f"[posttrain data] decoded {done_rows}/{len(items)} utterances ({len(bad)} set aside)")
    return tables, bad


# --------------------------------------------------------------------------- the entry points


def _manifest_states(train: Sequence[str], evals: Sequence[str], storage: Storage) -> list[dict[str, Any]]:
    """``uri``, ``split``, ``size``, ``etag`` of each manifest (ConfigError naming a missing one)."""
    out = []
    for split, field_name, uris in (("train", "posttrain.train_manifests", train),
                                    ("eval", "posttrain.eval_manifests", evals)):
        for i, uri in enumerate(uris):
            try:
                norm = normalize_uri(uri)
                entries = storage.list_files(norm)
            except StorageError as exc:
                raise ConfigError(f"{field_name}[{i}]: {exc}") from None
            if len(entries) != 1 or normalize_uri(entries[0].uri) != norm:
                raise ConfigError(f"{field_name}[{i}]: {uri} is not one manifest file")
            out.append({"uri": norm, "split": split, "size": entries[0].size, "etag": entries[0].etag})
    return out


def _settings() -> dict[str, Any]:
    return {"sample_rate": SAMPLE_RATE, "min_seconds": MIN_SECONDS, "version": POSTTRAIN_DATA_VERSION}


def _reusable(data_uri: str, states: list[dict[str, Any]], storage: Storage) -> Optional[PreparedData]:
    """The prepared data under ``data_uri`` when ``prepared.json`` names exactly these manifests and settings."""
    record_uri = join_uri(data_uri, PREPARED_FILE)
    try:
        rec = parse_prepared_record(storage.read_text(record_uri), record_uri)
    except FileNotFoundError:
        return None
    except (FormatError, StorageError, UnicodeDecodeError):
        return None   # unreadable or of another version: prepared again
    if rec["manifests"] != states or rec["settings"] != _settings():
        return None
    try:
        data = PreparedData(**{**rec["summary"], "reused": True})
    except TypeError:
        return None
    if not storage.exists(data.train_uri) or (data.eval_uri is not None and not storage.exists(data.eval_uri)):
        return None
    return data


def _split_stats(tables: list[pa.Table]) -> tuple[int, float, list[str], list[str]]:
    rows = sum(t.num_rows for t in tables)
    samples = sum(int(pc.sum(t["num_samples"]).as_py() or 0) for t in tables)
    speakers = sorted({s for t in tables for s in t["speaker"].to_pylist() if s is not None})
    languages = sorted({s for t in tables for s in t["language"].to_pylist() if s is not None})
    return rows, samples / SAMPLE_RATE, speakers, languages


def prepare_posttrain_data(train_manifests: Sequence[str], eval_manifests: Sequence[str], data_uri: str,
                           storage: Storage, *, ray_cfg: Any = None,
                           progress: bool | Callable[[str], None] = True) -> PreparedData:
    """Prepare (or reuse) the post-training tables under ``data_uri`` (local, ``~``, relative or s3://).

    Reuses the tables when ``data_uri/prepared.json`` names the same manifests with the same sizes and etags
    (audio files are not re-checked: change a manifest to prepare again). Otherwise reads the manifests,
    decodes the usable rows in Ray tasks (``ray_cfg``: a :class:`~spear.config.RayConfig` for an embedded or
    remote Ray; a Ray already initialised in this process is used as it is) and writes ``train.parquet``,
    ``eval.parquet`` (only with eval manifests), ``quarantine.jsonl`` and then ``prepared.json``.
    ``progress``: True prints lines to stderr, a callable gets them, False is silent.

    Raises :class:`ConfigError` (naming ``posttrain.train_manifests[i]`` / ``eval_manifests[i]``) for a missing
    or unparseable manifest or none at all, :class:`PostTrainDataError` when no training row is usable.
    """
    if not train_manifests:
        raise ConfigError("posttrain.train_manifests is empty: give at least one labelled manifest "
                          "(CSV/TSV/JSONL with audio and speaker/text/pivot, or a Lhotse CutSet)")
    say = console_log(progress)
    data_uri = normalize_uri(data_uri)
    states = _manifest_states(train_manifests, eval_manifests, storage)
    reused = _reusable(data_uri, states, storage)
    if reused is not None:
        say(f"[posttrain data] reusing the prepared tables under {data_uri} (manifests unchanged)")
        return reused

    t0 = time.monotonic()
    items, bad, _ = read_manifests([s["uri"] for s in states if s["split"] == "train"],
                                       [s["uri"] for s in states if s["split"] == "eval"], storage)
    say(f"[posttrain data] {len(items)} utterances to decode from {len(states)} manifests "
        f"({len(bad)} rows set aside while reading)")
    storage.delete(join_uri(data_uri, PREPARED_FILE))   # the tables below are not the recorded ones any more
    tables: dict[str, list[pa.Table]] = {"train": [], "eval": []}
    if items:
        with ray_session(ray_cfg, dashboard=False, announce=say):
            tables, rejected = _decode_on_ray(items, storage, say)
        bad.extend(rejected)
    quarantine_uri = join_uri(data_uri, QUARANTINE_FILE)
    storage.write_text(quarantine_uri, quarantine_jsonl(bad))
    stats = {split: _split_stats(tables[split]) for split in tables}
    kept = {u for split in tables for t in tables[split] for u in t["utt_id"].to_pylist()}
    notes = count_by(note for item in items if item["utt_id"] in kept for note in item["notes"])
    if stats["train"][0] == 0:
        raise PostTrainDataError(f"no usable training utterance in posttrain.train_manifests: {len(bad)} rows set "
                                 f"aside ({', '.join(f'{k}: {v}' for k, v in count_by(q['kind'] for q in bad).items()) or 'none'}), "
                                 f"see {quarantine_uri}")
    uris: dict[str, Optional[str]] = {}
    for split in ("train", "eval"):
        if split == "eval" and not eval_manifests:
            uris[split] = None
            continue
        uri = uris[split] = join_uri(data_uri, DATA_FILES[split])
        table = pa.concat_tables(tables[split]) if tables[split] else POSTTRAIN_UTTERANCE_SCHEMA.empty_table()
        storage.write_bytes(uri, parquet_bytes(table.replace_schema_metadata(POSTTRAIN_UTTERANCE_SCHEMA.metadata)))
    data = PreparedData(
        data_uri=data_uri, train_uri=uris["train"] or "", eval_uri=uris["eval"], quarantine_uri=quarantine_uri,
        rows={s: stats[s][0] for s in stats}, seconds={s: round(stats[s][1], 3) for s in stats},
        speakers={s: stats[s][2] for s in stats}, languages={s: stats[s][3] for s in stats},
        quarantined=len(bad), quarantine_reasons=count_by(q["kind"] for q in bad), label_notes=notes)
    summary = {k: v for k, v in data.to_dict().items() if k != "reused"}
    storage.write_text(join_uri(data_uri, PREPARED_FILE),
                       json.dumps(prepared_record(states, _settings(), summary), indent=1) + "\n")
    say(f"[posttrain data] prepared {data.rows['train']} train and {data.rows['eval']} eval utterances "
        f"in {time.monotonic() - t0:.1f} s ({len(bad)} set aside)")
    return data


def read_prepared(uri: str, storage: Storage, columns: Optional[Iterable[str]] = None) -> pa.Table:
    """A prepared table (``train.parquet`` / ``eval.parquet``) as a :data:`POSTTRAIN_UTTERANCE_SCHEMA` table
    (``columns``: only these). FileNotFoundError for a missing file; :class:`FormatError` naming ``uri`` for a
    file that is not a prepared table (or a newer version)."""
    data = storage.read_bytes(uri)
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FormatError(f"{uri} is not a Parquet file ({exc})") from None
    check_utterance_table(pf.schema_arrow.empty_table(), uri)
    table = check_utterance_table(pf.read(), uri)
    return table.select(list(columns)) if columns is not None else table
