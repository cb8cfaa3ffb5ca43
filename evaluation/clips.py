"""The evaluation's audio: every clip the tasks name, decoded once to 16 kHz mono PCM.

Clips are decoded with the pipeline's own decoder (:func:`spear.stages.audio.decode_segments`,
so any format the decode stage reads works here too) and kept whole up to
:data:`MAX_CLIP_SECONDS`; a file that cannot be read is skipped with its reason rather than
failing the evaluation.

Example::

    from spear.cluster.storage import Storage
    from spear.evaluation.clips import corpus_summary, decode_clips

    clips, skipped = decode_clips({0: "a.wav", 1: "b.flac"}, Storage())
    print(corpus_summary(clips, domains=["speech", "audio"])["minutes"], skipped)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from spear.cluster.storage import Storage
from spear.schemas.segments import SAMPLE_RATE
from spear.stages.audio import decode_segments

MAX_CLIP_SECONDS = 600.0  # longer clips are truncated (probes pool over at most this much)


@dataclass
class Clip:
    """One decoded clip and what the source file was."""

    pcm: np.ndarray  # int16, 16 kHz mono
    format: str
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_RATE


def decode_clip(uri: str, storage: Storage) -> Clip:
    """The clip at ``uri``, truncated to :data:`MAX_CLIP_SECONDS` (raises on an unreadable file)."""
    info, segments = decode_segments(storage.read_bytes(uri), max_segment_seconds=MAX_CLIP_SECONDS)
    pcm = segments[0][1] if segments else np.zeros(0, np.int16)  # clips longer than the cap are truncated
    return Clip(pcm, info.format, info.sample_rate, info.channels)


def decode_clips(uris: Mapping[int, str], storage: Storage) -> tuple[dict[int, Clip], list[dict[str, str]]]:
    """({item: clip} of the readable files, [{"uri", "reason"}] of the others), in the order of ``uris``."""
    clips: dict[int, Clip] = {}
    skipped: list[dict[str, str]] = []
    for i, uri in uris.items():
        try:
            clips[i] = decode_clip(uri, storage)
        except (OSError, ValueError, RuntimeError) as exc:  # AudioDecodeError is a ValueError
            skipped.append({"uri": uri, "reason": f"{type(exc).__name__}: {exc}"})
    return clips, skipped


def corpus_summary(clips: Mapping[int, Clip], domains: Sequence[str]) -> dict[str, Any]:
    """Files and minutes in all, and grouped by domain, source format, sample rate and channels.

    ``domains``: the domain of every item (indexed like ``clips``' keys)."""
    def group(key: Callable[[int], Any]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for i, c in clips.items():
            g = out.setdefault(str(key(i)), {"files": 0, "minutes": 0.0})
            g["files"] += 1
            g["minutes"] += c.seconds / 60
        return {k: {"files": v["files"], "minutes": round(v["minutes"], 3)} for k, v in sorted(out.items())}

    return {
        "files": len(clips),
        "minutes": round(sum(c.seconds for c in clips.values()) / 60, 3),
        "by_domain": group(lambda i: domains[i]),
        "by_format": group(lambda i: clips[i].format),
        "by_sample_rate": group(lambda i: clips[i].sample_rate),
        "by_channels": group(lambda i: clips[i].channels),
    }
