"""The writer stage and the driver's ObjectTracker, without Ray: real audio decoded by the decode stage,
written as real Parquet files in tmp_path, summaries folded in every order."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spear.config import DecodeConfig, SourceConfig
from spear.schemas.segments import DECODED_SCHEMA, SEGMENT_SCHEMA
from spear.schemas.write_summary import WRITE_SUMMARY, quarantine_records, written_objects
from spear.stages.catalog import build_catalog
from spear.stages.decode import DecodeStage
from spear.stages.writer import ObjectTracker, WriterStage

from support.audio_files import encode, make_signal

SECONDS = {"long.wav": 5.0, "mid.flac": 2.5, "short.wav": 1.0}   # 3, 2 and 1 segments of at most 2 s
CFG = DecodeConfig(max_segment_seconds=2.0, min_segment_seconds=0.5)


@pytest.fixture
def decoded(tmp_path) -> pa.Table:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, sec in SECONDS.items():
        (root / name).write_bytes(encode(make_signal(16000, 1, sec), 16000, name.rsplit(".", 1)[1]))
    (root / "broken.wav").write_bytes(b"RIFF but not really a wav file" * 4)
    cat = build_catalog([SourceConfig(uri=str(root), domain="speech", name="c")])
    return DecodeStage(CFG)(cat.objects)


def _summaries(decoded: pa.Table, directory: str, batch_rows: int) -> list[dict]:
    writer = WriterStage(directory, SEGMENT_SCHEMA)
    return [writer(decoded.slice(i, batch_rows)).to_pylist()[0] for i in range(0, decoded.num_rows, batch_rows)]


def test_decode_stage_emits_segments_and_one_row_per_bad_object(decoded):
    assert decoded.schema.equals(DECODED_SCHEMA)
    bad = decoded.filter(pa.compute.is_valid(decoded["quarantine_reason"])).to_pylist()
    assert [(r["relative_path"], r["quarantine_stage"]) for r in bad] == [("broken.wav", "decode")]
    good = decoded.filter(pa.compute.is_null(decoded["quarantine_reason"]))
    counts = {p: good["relative_path"].to_pylist().count(p) for p in SECONDS}
    assert counts == {"long.wav": 3, "mid.flac": 2, "short.wav": 1}
    assert all(r["object_segments"] == counts[r["relative_path"]] for r in good.to_pylist())


def test_writer_writes_the_good_rows_as_one_readable_file_and_summarises_it(decoded, tmp_path):
    out = tmp_path / "segments"
    summary = WriterStage(str(out), SEGMENT_SCHEMA, prefix="part")(decoded)
    assert summary.schema.equals(WRITE_SUMMARY) and summary.num_rows == 1
    row = summary.to_pylist()[0]
    (path,) = out.iterdir()
    assert row["file"] == str(path) and path.name.startswith("part-") and path.suffix == ".parquet"
    assert row["bytes"] == path.stat().st_size and row["rows"] == 6
    table = pq.read_table(path)
    assert table.schema.equals(SEGMENT_SCHEMA, check_metadata=False) and table.num_rows == 6
    assert row["audio_seconds"] == pytest.approx(sum(SECONDS.values()))
    objects = {o["uri"].rsplit("/", 1)[1]: o for o in written_objects(row)}
    assert {k: (o["segments"], o["object_segments"]) for k, o in objects.items()} == {
        "long.wav": (3, 3), "mid.flac": (2, 2), "short.wav": (1, 1)}
    (q,) = quarantine_records(row)
    assert q["uri"].endswith("broken.wav") and q["stage"] == "decode" and q["size"] > 0


def test_a_batch_of_only_bad_rows_writes_no_file(decoded, tmp_path):
    bad = decoded.filter(pa.compute.is_valid(decoded["quarantine_reason"]))
    row = WriterStage(str(tmp_path / "segments"), SEGMENT_SCHEMA)(bad).to_pylist()[0]
    assert (row["file"], row["rows"], row["bytes"], row["objects"]) == ("", 0, 0, [])
    assert len(row["quarantine"]) == 1 and not (tmp_path / "segments").exists()


def test_writer_reads_an_all_null_verdict_that_numpy_stages_turned_into_floats(decoded, tmp_path):
    good = decoded.filter(pa.compute.is_null(decoded["quarantine_reason"]))
    for name in ("quarantine_stage", "quarantine_reason"):
        good = good.set_column(good.schema.get_field_index(name), name, pa.array([float("nan")] * good.num_rows))
    row = WriterStage(str(tmp_path / "segments"), SEGMENT_SCHEMA)(good).to_pylist()[0]
    assert row["rows"] == 6 and row["quarantine"] == []


def test_tracker_completes_an_object_only_once_all_its_segments_are_written(decoded, tmp_path):
    tracker = ObjectTracker()
    completed = []
    for n, row in enumerate(_summaries(decoded, str(tmp_path / "segments"), batch_rows=2)):
        counts = tracker.add(row)
        got = tracker.take_completed()
        assert counts["objects"] == len(got) and counts["segments"] == row["rows"]
        for o in got:  # complete means every segment is in a file reported so far
            written = sum(1 for r in decoded.slice(0, 2 * (n + 1)).to_pylist()
                          if r["source_uri"] == o["uri"] and r["quarantine_reason"] is None)
            assert written == o["segments"] == o["object_segments"]
        completed += got
    assert sorted(o["uri"].rsplit("/", 1)[1] for o in completed) == sorted(SECONDS)
    assert tracker.partial == {} and tracker.take_completed() == []   # handed out once
    assert tracker.completed_total == 3 and tracker.rows == 6
    assert tracker.audio_seconds == pytest.approx(sum(SECONDS.values()))
    assert [q["uri"].rsplit("/", 1)[1] for q in tracker.quarantined] == ["broken.wav"]
    assert len(tracker.files) == len({f["file"] for f in tracker.files}) == sum(1 for _ in (tmp_path / "segments").iterdir())


def test_tracker_totals_do_not_depend_on_the_order_summaries_arrive_in(decoded, tmp_path):
    rows = _summaries(decoded, str(tmp_path / "segments"), batch_rows=3)
    results = set()
    for order in itertools.permutations(rows):
        tracker = ObjectTracker()
        for row in order:
            tracker.add(row)
        done = tracker.take_completed()
        results.add((tuple(sorted((o["uri"], o["segments"], round(o["audio_seconds"], 6)) for o in done)),
                     tracker.rows, len(tracker.quarantined), tracker.completed_total))
    assert len(results) == 1
    (done, rows_total, quarantined, completed), = results
    assert len(done) == completed == 3 and rows_total == 6 and quarantined == 1


def test_tracker_keeps_an_object_partial_while_a_file_is_missing(decoded, tmp_path):
    rows = _summaries(decoded, str(tmp_path / "segments"), batch_rows=1)
    tracker = ObjectTracker()
    long_rows = [r for r in rows if any(o["uri"].endswith("long.wav") for o in written_objects(r))]
    for row in long_rows[:-1]:
        tracker.add(row)
    assert tracker.take_completed() == []
    (pending,) = tracker.partial.values()
    assert pending["uri"].endswith("long.wav") and (pending["segments"], pending["object_segments"]) == (2, 3)
    tracker.add(long_rows[-1])
    (done,) = tracker.take_completed()
    assert done["segments"] == 3 and done["audio_seconds"] == pytest.approx(SECONDS["long.wav"])


def test_the_progress_counts_an_object_kept_in_part_apart_from_the_quarantined_ones():
    """The job's summary counts a partly kept object as kept in part, not quarantined; the progress line did
    (a corpus with one empty, one unreadable and one truncated file showed 3 quarantined, the summary 2)."""
    from spear.schemas.quarantine import partial_reason, quarantine_record
    from spear.schemas.write_summary import summary_table

    obj = {"uri": "/c/a.flac", "source": "c", "domain": "speech", "etag": "1-2", "size": 9}
    records = [quarantine_record(obj, "decode", partial_reason(0.1, 1.8, "flac decoder lost sync")),
               quarantine_record(dict(obj, uri="/c/empty.wav"), "read", "empty object (0 bytes)")]
    row = summary_table("", rows=0, size=0, audio_seconds=0.0, objects=[], quarantine=records).to_pylist()[0]
    counts = ObjectTracker().add(row)
    assert (counts["quarantined"], counts["kept in part"]) == (1, 1)
