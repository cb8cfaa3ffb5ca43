"""``load_teacher``: a :class:`~spear.config.TeacherConfig` in, a ready frozen teacher out.

Example::

    >>> from spear.models.teachers import load_teacher
    >>> from spear.config import TeacherConfig
    >>> t = load_teacher(TeacherConfig(kind="fbank"), device="cpu")
    >>> t.name, t.frame_rate, t.dim
    ('fbank', 25.0, 128)

A ``wavlm`` / ``hubert`` / ``dasheng`` teacher reads its checkpoint from ``cfg.path``
(local, file:// or s3://; remote checkpoints are cached locally, see
:mod:`spear.models.teachers.checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from spear.cluster.storage import Storage

from .base import Teacher
from .checkpoint import fetch_checkpoint

TEACHER_KINDS = ("mfcc", "fbank", "wavlm", "hubert", "dasheng", "student")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_teacher(cfg: Any, storage: Storage | None = None, device: str | torch.device | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Teacher:
    """Build the teacher ``cfg`` describes, frozen, in eval mode, on ``device`` (default: CUDA if present).

    ``cfg`` is a TeacherConfig (or a mapping of its fields). On CUDA the model runs under
    autocast in ``cfg.dtype``; on CPU in float32. Raises ValueError for a bad kind or
    layer, FileNotFoundError / StorageError when the checkpoint cannot be read.
    """
    if isinstance(cfg, Mapping):
        from spear.config import TeacherConfig

        cfg = TeacherConfig.model_validate(dict(cfg))
    kind = cfg.kind
    if kind in ("mfcc", "fbank"):
        if cfg.layer is not None:
            raise ValueError(f"teacher kind '{kind}' has no layers: leave `layer` unset")
        from .features import FbankTeacher, MfccTeacher

        teacher: Teacher = MfccTeacher() if kind == "mfcc" else FbankTeacher()
    elif kind in ("wavlm", "hubert"):
        from .hf import HF_FILE_PATTERNS, load_hf_teacher

        local = fetch_checkpoint(cfg.path, storage, cache_dir, patterns=HF_FILE_PATTERNS)
        teacher = load_hf_teacher(kind, local, cfg.layer)
    elif kind == "dasheng":
        from .dasheng import DashengTeacher, build_dasheng

        local = fetch_checkpoint(cfg.path, storage, cache_dir, patterns=("*.pt", "*.pth", "*.ckpt"))
        encoder, weights_hash = build_dasheng(local)
        teacher = DashengTeacher(encoder, cfg.layer, weights_hash)
    elif kind == "student":
        from spear.models.student import load_student

        from .student import StudentTeacher

        student = load_student(cfg.path, storage=storage, device="cpu", cache_dir=cache_dir)
        teacher = StudentTeacher(student, cfg.layer, student.config["weights_sha256"])
    else:
        raise ValueError(f"unknown teacher kind {kind!r}: use one of {', '.join(TEACHER_KINDS)}")
    teacher = teacher.eval().requires_grad_(False).to(torch.device(device) if device is not None else default_device())
    teacher.autocast_dtype = _DTYPES[cfg.dtype]
    return teacher
