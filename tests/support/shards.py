"""A real token store built without teachers: synthetic audio + tokens, written through the
production shard writer and committed through the ledger (for training-side tests and benches)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from spear.cluster.storage import Storage
from spear.pipeline.ledger import TokenStore
from spear.pipeline.tokenize_job import add_token_metadata
from spear.schemas.ledger import tokenized_entry
from spear.schemas.segments import segment_id
from spear.schemas.shards import token_shard_schema
from spear.stages.audio import flac_encode, float_to_pcm16
from spear.stages.writer import ObjectTracker, WriterStage

RATES = {"speech": 50.0, "audio": 25.0}
CODEBOOKS = {"speech": 4, "audio": 2}


def make_token_store(storage: Storage, output: str, *, n_speech: int = 8, n_audio: int = 6, seconds=(1.0, 3.0),
                     rows_per_shard: int = 5, seed: int = 0, version: str = "tv-synthetic") -> TokenStore:
    rng = np.random.default_rng(seed)
    store = TokenStore(output, version, storage)
    store.write_version_info({"token_version": version, "teachers": {
        r: {"num_codebooks": CODEBOOKS[r], "frame_rate": RATES[r], "teacher": f"synthetic-{r}", "version": r}
        for r in RATES}})
    rows = []
    for domain, n in (("speech", n_speech), ("audio", n_audio)):
        for i in range(n):
            dur = float(rng.uniform(*seconds))
            ns = int(dur * 16000)
            t = np.arange(ns) / 16000
            x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.02 * rng.standard_normal(ns)
            uri = f"synthetic://{domain}/{i:04d}.flac"
            row = {"segment_id": segment_id(domain, f"{i:04d}.flac", "sha", 0), "source": domain, "source_uri": uri,
                   "relative_path": f"{i:04d}.flac", "source_etag": "e", "source_size": ns * 2,
                   "content_sha256": "sha", "domain": domain, "offset": 0, "num_samples": ns, "duration": ns / 16000,
                   "sample_rate": 16000, "audio": flac_encode(float_to_pcm16(x)), "object_segments": 1,
                   "quarantine_stage": None, "quarantine_reason": None}
            for role in RATES:
                nf = int(dur * RATES[role])
                row[f"{role}_tokens"] = rng.integers(0, 256, (nf, CODEBOOKS[role]), dtype=np.uint8).tobytes()
                row[f"{role}_num_frames"] = nf
            rows.append(row)
    run_id = "run-synthetic"
    meta = {r: {"domains": None if r == "speech" else ("audio",), "num_codebooks": CODEBOOKS[r],
                "frame_rate": RATES[r], "codebook": r} for r in RATES}
    tracker = ObjectTracker()
    for start in range(0, len(rows), rows_per_shard):
        batch = pa.Table.from_pylist(rows[start:start + rows_per_shard])
        summary = WriterStage(store.shard_dir(run_id), token_shard_schema(list(RATES)), storage.options, prefix="shard",
                              transform=lambda t: add_token_metadata(t, run_id=run_id, roles=meta))(batch)
        tracker.add(summary.to_pylist()[0])
    ledger = [tokenized_entry(o, run_id) for o in tracker.take_completed()]
    store.commit(run_id, [dict(f, run_id=run_id) for f in tracker.files], ledger)
    return store
