"""Frozen teacher models behind one interface.

``build_teacher(kind, layer, local checkpoint) -> Teacher`` (from a ``TeacherConfig`` and
storage: :func:`spear.stages.teacher_loading.load_teacher`); a teacher maps padded 16 kHz waveforms
[B, S] + lengths [B] to the frame embeddings [B, T, D] of one layer + frame counts [B],
and carries ``name``, ``frame_rate``, ``dim`` and a ``version`` id (sha256 of weights,
layer and preprocessing).

Kinds: ``mfcc`` (speech, 50 Hz, 78-d) and ``fbank`` (audio, 25 Hz, 128-d) need no weights;
``wavlm`` / ``hubert`` load Hugging Face checkpoints; ``dasheng`` loads the published
Dasheng checkpoints with our own torch implementation; ``resemblyzer`` (GE2E speaker encoder,
50 Hz, 256-d) and ``crepe`` (CREPE pitch network, 25 Hz) load the weights their PyPI wheels ship;
``student`` wraps an exported student.

Example::

    >>> import torch
    >>> from spear.models.teachers import build_teacher
    >>> teacher = build_teacher("mfcc", device="cpu")
    >>> out = teacher(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
    >>> out.embeddings.shape, out.num_frames.tolist()
    (torch.Size([2, 49, 78]), [49, 24])
"""

from .base import Teacher, TeacherOutput, conv_frames, file_sha256, hash_state_dict, make_version
from .dasheng import DashengConfig, DashengEncoder, DashengTeacher, load_dasheng_checkpoint, save_dasheng_checkpoint
from .crepe import CrepeTeacher
from .features import FbankTeacher, MfccTeacher
from .resemblyzer import ResemblyzerTeacher
from .hf import HFTeacher, load_hf_teacher
from .registry import AUTOCAST_DTYPES, CHECKPOINT_FILES, TEACHER_KINDS, build_teacher
from .student import StudentTeacher

__all__ = [
    "Teacher", "TeacherOutput", "build_teacher", "TEACHER_KINDS", "CHECKPOINT_FILES", "AUTOCAST_DTYPES",
    "MfccTeacher", "FbankTeacher", "HFTeacher", "load_hf_teacher",
    "DashengConfig", "DashengEncoder", "DashengTeacher", "load_dasheng_checkpoint", "save_dasheng_checkpoint",
    "ResemblyzerTeacher", "CrepeTeacher",
    "StudentTeacher", "conv_frames", "file_sha256", "hash_state_dict", "make_version",
]
