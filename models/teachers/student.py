"""A trained SPEAR student as a teacher: the next iteration's targets (HuBERT-style refinement).

Wraps an exported student (a :class:`~spear.models.student.StudentModel`, e.g. from
:func:`spear.stages.artefacts.load_student`: safetensors + config.json)
behind the :class:`~spear.models.teachers.base.Teacher` interface: the frame features of one
encoder layer (default: the last) at the student's output rate.

Example::

    teacher = build_teacher("student", layer=4, student=load_student("out/export"))
"""

from __future__ import annotations

import torch

from .base import Teacher, make_version


class StudentTeacher(Teacher):
    def __init__(self, student, layer: int | None, weights_sha256: str):
        super().__init__()
        n = student.num_layers
        if layer is None:
            layer = n - 1
        if not 0 <= layer < n:
            raise ValueError(f"student teacher: layer {layer} out of range (the student has layers 0..{n - 1})")
        self.student = student
        self.layer = layer
        self.name = "student"
        self.frame_rate = float(student.frame_rate)
        self.dim = int(student.layer_dims[layer])
        self.version = make_version("student", weights_sha256, layer, {"frontend": student.config.get("frontend")})

    def num_frames_for(self, num_samples):
        n = self.student.num_frames_for(num_samples)
        return n if isinstance(num_samples, torch.Tensor) else int(n)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.student.features(wavs, lengths).layers[self.layer]
