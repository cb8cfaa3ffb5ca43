"""`spear demo`: the embedded default, end to end on one machine.

Generates (once, cached) a labelled mixed corpus of espeak-ng speech and procedural sound
events, then runs the pipeline on it with local Ray and local storage. The stages that
exist so far run: corpus -> decode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from spear.pipeline.config import SourceConfig, SpearConfig
from spear.pipeline.decode_job import DecodeSummary, run_decode
from spear.pipeline.progress import Progress


@dataclass
class DemoSummary:
    workdir: str
    corpus: dict[str, Any]
    decode: DecodeSummary

    def to_dict(self) -> dict[str, Any]:
        return {"workdir": self.workdir, "corpus": self.corpus, "decode": self.decode.to_dict(),
                "stages_run": ["corpus", "decode"]}

    def human(self) -> str:
        c, d = self.corpus, self.decode
        lines = [
            f"demo corpus: {c['num_files']} files, {c['total_seconds'] / 60:.1f} min of audio at {c['root']}",
            f"decode: {d.decoded_objects}/{d.objects} objects -> {d.segments} segments, "
            f"{d.audio_seconds / 3600:.3f} h in {d.wall_seconds:.1f} s ({d.realtime_factor:.0f}x real time)",
            f"segments: {d.output}",
        ]
        if d.quarantined:
            lines.append(f"quarantined {len(d.quarantined)}: " + ", ".join(q["uri"] for q in d.quarantined))
        return "\n".join(lines)


def run_demo(cfg: SpearConfig, *, workdir: str = "spear-demo", size: str = "demo") -> DemoSummary:
    """Generate the demo corpus under ``workdir`` and run the pipeline stages on it."""
    from spear.pipeline.demo_corpus import generate_demo_corpus

    workdir = os.path.abspath(workdir)
    meter = Progress("corpus")
    corpus = generate_demo_corpus(os.path.join(workdir, "corpus"), size=size, seed=0,
                                  progress=lambda line: print(f"[corpus] {line}", file=meter.stream, flush=True))
    cfg = cfg.model_copy(deep=True)
    if not cfg.corpus.sources:
        cfg.corpus.sources = [SourceConfig(uri=str(corpus.speech_dir), domain="speech", name="demo-speech"),
                              SourceConfig(uri=str(corpus.audio_dir), domain="audio", name="demo-audio")]
    cfg.output = os.path.join(workdir, "decoded")
    decoded = run_decode(cfg, overwrite=True)
    corpus_info = {"root": str(corpus.root), "num_files": corpus.num_files, "total_seconds": corpus.total_seconds}
    return DemoSummary(workdir=workdir, corpus=corpus_info, decode=decoded)
