"""``load_teacher``: a :class:`~spear.config.TeacherConfig` in, a ready frozen teacher out.

Kind ``spear`` reads a released SPEAR model (:func:`spear.stages.artefacts.load_any_student`).
Fetches the checkpoint ``cfg.path`` names (local, file:// or s3://; remote checkpoints are
cached locally, see :func:`spear.stages.artefacts.fetch_checkpoint`) and builds the teacher
with :func:`spear.models.teachers.build_teacher`.

Example::

    >>> from spear.config import TeacherConfig
    >>> from spear.stages.teacher_loading import load_teacher
    >>> t = load_teacher(TeacherConfig(kind="fbank"), device="cpu")
    >>> t.name, t.frame_rate, t.dim
    ('fbank', 25.0, 128)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import torch

from spear.cluster.storage import Storage
from spear.config import TeacherConfig
from spear.models.teachers import CHECKPOINT_FILES, Teacher, build_teacher

from .artefacts import fetch_checkpoint, load_any_student, load_student


def load_teacher(cfg: Union[TeacherConfig, Mapping[str, Any]], storage: Storage | None = None,
                 device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None) -> Teacher:
    """Build the teacher ``cfg`` describes, frozen, in eval mode, on ``device`` (default: CUDA if present).

    ``cfg`` is a TeacherConfig (or a mapping of its fields). On CUDA the model runs under
    autocast in ``cfg.dtype``; on CPU in float32. Raises ValueError for a bad kind or
    layer, FileNotFoundError / StorageError when the checkpoint cannot be read.
    """
    if isinstance(cfg, Mapping):
        cfg = TeacherConfig.model_validate(dict(cfg))
    checkpoint = student = None
    if cfg.kind == "student":  # weights on the CPU until the teacher moves to its device
        student = load_student(cfg.path, storage=storage, device="cpu", cache_dir=cache_dir)
    elif cfg.kind == "spear":  # a released SPEAR model (icefall .pt / transformers-style), or a spear export
        student = load_any_student(cfg.path, storage=storage, device="cpu", cache_dir=cache_dir)
    elif cfg.kind in CHECKPOINT_FILES and cfg.path:  # no path: resemblyzer / crepe read their installed wheel's file
        checkpoint = fetch_checkpoint(cfg.path, storage, cache_dir, patterns=CHECKPOINT_FILES[cfg.kind])
    return build_teacher(cfg.kind, cfg.layer, checkpoint, student=student, dtype=cfg.dtype, device=device)
