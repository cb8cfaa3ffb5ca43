"""decode.json: round trip, the versions this spear reads, and one-line errors for the rest."""

from __future__ import annotations

import json

import pytest

from spear.schemas.decode_record import DECODE_RECORD_NAME, DECODE_RECORD_VERSION, DecodeRecord
from spear.schemas.versioning import FormatError, check_version


def _record() -> DecodeRecord:
    return DecodeRecord(files=["segments/part-a.parquet", "segments/part-b.parquet"], summary={"segments": 7},
                        decode_config={"sample_rate": 16000}, sources=[{"uri": "/c", "domain": "speech"}])


def test_round_trip():
    text = _record().to_json()
    d = json.loads(text)
    assert list(d) == ["kind", "schema_version", "record_version", "files", "summary", "decode_config", "sources"]
    assert d["kind"] == "spear.decode" and d["record_version"] == DECODE_RECORD_VERSION == 2
    assert DecodeRecord.from_json(text) == _record()


def test_a_version_1_record_reads_and_says_so():
    d = json.loads(_record().to_json())
    d.pop("record_version")
    back = DecodeRecord.from_json(json.dumps(d))
    assert back.record_version == 1 and back.files == _record().files


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(record_version=3), "is version 3, newer than this spear reads (1 to 2): upgrade spear"),
    (lambda d: d.update(schema_version=5), "segments of decode record /o/decode.json is version 5"),
    (lambda d: d.update(kind="spear.train"), "is not a spear.decode record (kind 'spear.train')"),
    (lambda d: d.update(record_version="two"), "has no readable version ('two')"),
    (lambda d: d.pop("files"), "has no list of files"),
])
def test_wrong_records_are_one_line_errors_naming_the_file(change, words):
    d = json.loads(_record().to_json())
    change(d)
    with pytest.raises(FormatError) as err:
        DecodeRecord.from_json(json.dumps(d), where="/o/decode.json")
    assert words in str(err.value) and "/o/decode.json" in str(err.value) and "\n" not in str(err.value)


def test_not_json_at_all():
    with pytest.raises(FormatError, match=f"decode record {DECODE_RECORD_NAME} is not valid JSON"):
        DecodeRecord.from_json("{not json")
    with pytest.raises(FormatError, match="is not a JSON object"):
        DecodeRecord.from_json("[1, 2]")


def test_check_version_bounds():
    assert check_version("x", "2", supported=3) == 2
    with pytest.raises(FormatError, match="x is version 1, older than this spear reads \\(2 to 3\\)"):
        check_version("x", 1, supported=3, oldest=2)
    with pytest.raises(FormatError, match="x has no readable version"):
        check_version("x", None, supported=3)
