"""A trained SPEAR student as a teacher: the next iteration's targets (HuBERT-style refinement).

Wraps an exported student (a :class:`~spear.models.student.StudentModel`, e.g. from
:func:`spear.stages.artefacts.load_student`: safetensors + config.json)
behind the :class:`~spear.models.teachers.base.Teacher` interface: the frame features of one
encoder layer (default: the last) at the student's output rate.

Example::

    teacher = build_teacher("student", layer=4, student=load_student("out/export"))
    teacher = build_teacher("spear", layer=8, student=load_spear_release("spear-base-speech-audio/"))

Kind ``spear`` is the same wrapper around a released SPEAR model (the authors' icefall ``.pt`` or
transformers-style folder, converted by :func:`spear.stages.artefacts.load_spear_release`): the
next SPEAR iteration's teacher, or SPEAR as the teacher of a smaller student.
"""

from __future__ import annotations

import torch

from .base import Teacher, make_version


class StudentTeacher(Teacher):
    def __init__(self, student, layer: int | None, weights_sha256: str, name: str = "student"):
        super().__init__()
        n = student.num_layers
        if layer is None:
            layer = n - 1
        if not 0 <= layer < n:
            raise ValueError(f"student teacher: layer {layer} out of range (the student has layers 0..{n - 1})")
        self.student = student
        self.layer = layer
        self.name = name  # "spear": a released SPEAR model converted to this project's Zipformer2
        self.frame_rate = float(student.frame_rate)
        self.dim = int(student.layer_dims[layer])
        self.version = make_version(name, weights_sha256, layer, {"frontend": student.config.get("frontend")})

    def num_frames_for(self, num_samples):
        n = self.student.num_frames_for(num_samples)
        return n if isinstance(num_samples, torch.Tensor) else int(n)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.student.features(wavs, lengths).layers[self.layer]
