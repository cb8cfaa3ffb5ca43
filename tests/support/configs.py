"""Small, fast pipeline configs for the tests."""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

from spear.cluster.storage import join_uri
from spear.config import SourceConfig, load_config

SMALL = ["mvq.speech_codebooks=4", "mvq.audio_codebooks=2", "mvq.codebook_size=16", "mvq.sample_frames=1000",
         "mvq.heldout_fraction=0.1", "decode.max_segment_seconds=2", "tokenize.shard_target_mb=0.2",
         "tokenize.commit_interval_s=0.5", "decode.objects_per_task=2"]


def storage_sets(st) -> list[str]:
    """--set overrides that point a job at ``st``'s S3 endpoint and credentials (none for local disk)."""
    o = st.options
    if not o.endpoint_url:
        return []
    return [f"storage.endpoint_url={o.endpoint_url}", f"storage.access_key_id={o.key}",
            f"storage.secret_access_key={o.secret}"]


def tokenize_cfg(st, corpus_root: str, out: str, extra=()):
    cfg = load_config(None, [f"output={out}"] + SMALL + list(extra) + storage_sets(st))
    cfg.corpus.sources = [SourceConfig(uri=join_uri(corpus_root, "speech"), domain="speech", name="speech"),
                          SourceConfig(uri=join_uri(corpus_root, "audio"), domain="audio", name="audio")]
    return cfg


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: bound, never listening,
    so no other process can take it (a port from free_port() can be grabbed by a neighbour)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
