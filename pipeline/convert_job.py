"""``spear convert-checkpoint``: a SPEAR model from one layout into another.

Layouts: ``spear`` (this project's export: ``model.safetensors`` + ``config.json``, what `spear
export` writes and `load_student` reads), ``icefall`` (the authors' ``.pt`` holding
``{"model": state_dict}``) and ``hf`` (the authors' transformers-style release:
``model.safetensors`` + ``config.json``). The source layout is detected; the key map and the
numeric transforms are :mod:`spear.models.student.convert`. Nothing is executed from the source
file: ``torch.load(weights_only=True)`` or safetensors only.

Example::

    summary = run_convert("spear-base-speech-audio/", "runs/spear-base", to="spear")
    print(summary.human())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from spear.cluster.storage import Storage
from spear.stages.artefacts import export_student, load_any_student, save_spear_release

TARGETS = ("spear", "icefall", "hf")


@dataclass
class ConvertSummary:
    """What was converted: source and its layout, destination and its layout, the model's shape, the
    files written, and what the conversion ignored (training heads), filled or noted."""

    source: str
    source_layout: str
    dest: str
    to: str
    num_parameters: int
    num_layers: int
    frame_rate: float
    files: list[str]
    ignored: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        lines = [f"converted {self.source} ({self.source_layout}) -> {self.dest} ({self.to}): "
                 f"Zipformer2 of {self.num_parameters / 1e6:.1f}M parameters, {self.num_layers} layers, "
                 f"{self.frame_rate:g} Hz"]
        lines += [f"  wrote {f}" for f in self.files]
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} training-head tensors (not part of the encoder)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def run_convert(source: str, dest: str, to: str, storage: Optional[Storage] = None,
                num_mel_bins: Optional[int] = None) -> ConvertSummary:
    """Convert the model at ``source`` (a spear export, an icefall ``.pt`` or a transformers-style
    release; local or s3://) into layout ``to`` at ``dest``. Raises ValueError for an unknown
    layout or a model the target cannot hold (a transformer student has no icefall layout)."""
    if to not in TARGETS:
        raise ValueError(f"unknown target layout {to!r}: use one of {', '.join(TARGETS)}")
    storage = storage or Storage()
    student = load_any_student(source, storage, device="cpu", num_mel_bins=num_mel_bins)
    conversion = student.config.get("conversion", {})
    if to == "spear":
        metadata = dict(student.config.get("metadata", {}))
        metadata.setdefault("converted_from", source)
        export_student(student, dest, metadata=metadata, storage=storage)  # with its frontend (a release's mel band)
        files = [f"{dest.rstrip('/')}/model.safetensors", f"{dest.rstrip('/')}/config.json"]
    else:
        files = save_spear_release(student.encoder, dest, layout=to, storage=storage)
    return ConvertSummary(source=source, source_layout=conversion.get("layout", "spear"), dest=dest, to=to,
                          num_parameters=student.encoder.num_parameters(), num_layers=student.num_layers,
                          frame_rate=float(student.frame_rate), files=files,
                          ignored=list(conversion.get("ignored", [])), filled=list(conversion.get("filled", [])),
                          notes=list(conversion.get("notes", [])))
