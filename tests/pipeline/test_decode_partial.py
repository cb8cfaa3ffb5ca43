"""Objects cut off half way keep their decodable part through decode and tokenize; the decode
summary's figures are the same on stdout, in --json and in the commit record."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from spear.cluster.storage import Storage, join_uri
from spear.pipeline.decode_job import DecodeSummary
from spear.pipeline.ledger import TokenStore
from spear.pipeline.tokenize_job import run_tokenize

from support.audio_files import encode, make_signal
from support.configs import tokenize_cfg
from support.corpus import write_mixed_corpus


def _cut(codec: str, rate: int, seconds: float) -> bytes:
    data = encode(make_signal(rate, 1, seconds), rate, codec)
    return data[: len(data) // 2]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


def test_every_figure_of_the_human_summary_is_one_of_the_json_figures():
    s = DecodeSummary(objects=12, decoded_objects=10, segments=40, audio_seconds=1234.5, output="out",
                      quarantined=[{"uri": "a.flac", "stage": "decode", "reason": "partial: kept 3.2 s of ~6.4 s: x",
                                    "kept_seconds": 3.2},
                                   {"uri": "b.wav", "stage": "decode", "reason": "empty object (0 bytes)"}],
                      wall_seconds=1560.0, ray_start_seconds=27.25, decode_seconds=410.0)
    d = s.to_dict()
    first = s.human().splitlines()[0]
    assert _numbers(first) == pytest.approx([d["decoded_objects"], d["objects"], d["segments"], round(d["audio_seconds"], 1),
                                             round(d["wall_seconds"], 1), round(d["realtime_factor"], 2),
                                             round(d["ray_start_seconds"], 1), round(d["decode_seconds"], 1),
                                             round(d["decode_realtime_factor"], 2)])
    assert "0.79x real time" in first and d["partial_objects"] == 1  # 1234.5 / 1560: never rounded to "1x"
    assert "kept in part 1" in s.human() and "quarantined 1:" in s.human()
    assert "4.500 h of audio" in DecodeSummary(objects=1, decoded_objects=1, segments=1, audio_seconds=16200.0,
                                               wall_seconds=10.0).human()


@pytest.mark.slow
def test_decode_cli_prints_the_figures_it_records(ray_cluster, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.flac").write_bytes(encode(make_signal(44100, 2, 3.0), 44100, "flac"))
    (src / "cut.flac").write_bytes(_cut("flac", 44100, 6.4))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    r = subprocess.run([sys.executable, "-m", "spear.pipeline.cli", "decode", "--input", str(src), "--domain", "speech",
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "decode.json").read_text())["summary"]
    again = DecodeSummary(**{k: record[k] for k in ("objects", "decoded_objects", "segments", "audio_seconds",
                                                      "quarantined", "output", "wall_seconds", "ray_start_seconds",
                                                      "decode_seconds")})
    assert r.stdout.strip() == again.human()  # what the user read is what the run recorded
    assert record["decoded_objects"] == 2 and record["partial_objects"] == 1
    assert "cut.flac: partial: kept 3.1 s of ~6.4 s: corrupt audio" in r.stdout


@pytest.mark.slow
def test_a_partial_object_is_tokenized_and_noted(ray_cluster, tmp_path):
    st, root = Storage(), str(tmp_path)
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=3, n_audio=0, seed=11)
    cut_uri = join_uri(root, "corpus", "speech", "cut.wav")
    st.write_bytes(cut_uri, _cut("wav", 16000, 5.0))
    cfg = tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out"))
    cfg.corpus.sources = cfg.corpus.sources[:1]
    s = run_tokenize(cfg, progress=False)

    assert s.new_objects == 4 and s.committed_objects == 4
    # kept in part: tokenised (counted in new_objects), listed as partial, not as quarantined
    assert s.quarantined == [] and [q["uri"] for q in s.partial] == [cut_uri]
    assert s.partial[0]["reason"].startswith("partial: kept 2.5 s") and s.to_dict()["partial_objects"] == 1
    assert "kept in part 1" in s.human() and "quarantined" not in s.human()
    store = TokenStore(cfg.output, s.token_version, st)
    ledger = store.ledger().to_pylist()
    entry = next(e for e in ledger if e["source_uri"] == cut_uri)
    assert entry["status"] == "tokenized" and entry["segments"] == 2 and entry["reason"].startswith("decode: partial:")
    rows = store.read_table(["segment_id", "source_uri", "num_samples", "speech_tokens"])
    mine = rows.filter(pc.equal(rows["source_uri"], cut_uri))
    assert mine.num_rows == 2 and sum(mine["num_samples"].to_pylist()) == round(entry["audio_seconds"] * 16000)
    assert entry["audio_seconds"] == pytest.approx(2.5, abs=0.01)
    assert all(t is not None for t in mine["speech_tokens"].to_pylist())
