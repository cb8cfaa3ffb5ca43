"""Frozen teacher models behind one interface.

``load_teacher(TeacherConfig) -> Teacher``; a teacher maps padded 16 kHz waveforms
[B, S] + lengths [B] to the frame embeddings [B, T, D] of one layer + frame counts [B],
and carries ``name``, ``frame_rate``, ``dim`` and a ``version`` id (sha256 of weights,
layer and preprocessing).

Kinds: ``mfcc`` (speech, 50 Hz, 78-d) and ``fbank`` (audio, 25 Hz, 128-d) need no weights;
``wavlm`` / ``hubert`` load Hugging Face checkpoints; ``dasheng`` loads the published
Dasheng checkpoints with our own torch implementation; ``student`` arrives with training.

Example::

    >>> import torch
    >>> from spear.models.teachers import load_teacher
    >>> from spear.config import TeacherConfig
    >>> teacher = load_teacher(TeacherConfig(kind="mfcc"), device="cpu")
    >>> out = teacher(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
    >>> out.embeddings.shape, out.num_frames.tolist()
    (torch.Size([2, 49, 78]), [49, 24])
"""

from .base import Teacher, TeacherOutput, conv_frames, hash_state_dict, make_version
from .checkpoint import fetch_checkpoint
from .dasheng import DashengConfig, DashengEncoder, DashengTeacher, load_dasheng_checkpoint, save_dasheng_checkpoint
from .features import FbankTeacher, MfccTeacher
from .hf import HFTeacher, load_hf_teacher
from .registry import TEACHER_KINDS, default_device, load_teacher

__all__ = [
    "Teacher", "TeacherOutput", "load_teacher", "TEACHER_KINDS", "default_device",
    "MfccTeacher", "FbankTeacher", "HFTeacher", "load_hf_teacher",
    "DashengConfig", "DashengEncoder", "DashengTeacher", "load_dasheng_checkpoint", "save_dasheng_checkpoint",
    "fetch_checkpoint", "conv_frames", "hash_state_dict", "make_version",
]
