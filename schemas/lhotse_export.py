"""Token datasets as Lhotse cuts: the field names, frame shifts and dtypes `spear export-tokens` writes.

One live row of a token version becomes one Lhotse ``MonoCut`` (start 0, the row's 16 kHz mono
audio as its recording, one supervision spanning it). The names are those the SPEAR authors'
icefall training code reads (marcoyang1998/icefall, branch ``at_asr_multi_kd``,
``egs/general_audio_encoder/mtl/zipformer_audio_encoder/dataset_speech_audio_mvq.py``):

- ``codebook_indexes``: the speech teacher's MVQ indexes, a ``TemporalArray`` [frames, codebooks]
  of uint8 (``multi_quantization.Quantizer.encode`` returns uint8 and the authors store that
  array as is; their collate widens it to int64 and pads with -100), ``temporal_dim`` 0,
  ``frame_shift`` = 1 / the teacher's frame rate (0.02 s for a 50 Hz speech teacher);
- ``audio_codebook_indexes``: the audio teacher's, the same way (0.04 s for a 25 Hz Dasheng);
  absent on speech cuts, which have no audio-teacher tokens (the authors' collate substitutes
  -100 for a missing field, so the loss ignores it);
- ``task_id``: 1 for speech cuts, 2 for audio cuts (their dataset asserts it and batches by it);
- ``spear_segment_id``, ``source_uri`` (the ledger key: the object's URI, or ``lhotse-cut:<id>``),
  ``source_path`` (the object's path under its source, or a cut's recording location),
  ``source_offset`` (seconds into it), ``domain`` and ``token_version``: where the row came from.

Example::

    >>> token_field("speech"), token_field("audio"), TASK_IDS["audio"]
    ('codebook_indexes', 'audio_codebook_indexes', 2)
    >>> shar_fields(["speech", "audio"])["audio_codebook_indexes"]
    'numpy'
"""

from __future__ import annotations

from typing import Sequence

LHOTSE_EXPORT_VERSION = 1          # recorded in every cut's custom ``spear_export`` field

FORMATS = ("lhotse-shar", "lhotse-cuts")

# teacher role -> the custom field the authors' icefall code reads its MVQ indexes from
TOKEN_FIELDS = {"speech": "codebook_indexes", "audio": "audio_codebook_indexes"}
TASK_IDS = {"speech": 1, "audio": 2}
TOKEN_DTYPE = "uint8"

# Shar: the audio re-encoded by Lhotse as FLAC (lossless: the samples equal the shard's), arrays as .npy
SHAR_AUDIO_FORMAT = "flac"
SHAR_ARRAY_FORMAT = "numpy"

# lhotse-cuts: one manifest plus files under DEST
CUTS_MANIFEST = "cuts.jsonl.gz"
RECORDINGS_DIR = "recordings"      # recordings/<shard>/<segment_id>.flac (the shard's own FLAC bytes)


def token_field(role: str) -> str:
    """The custom field holding teacher ``role``'s indexes."""
    return TOKEN_FIELDS[role]


def shar_fields(roles: Sequence[str]) -> dict[str, str]:
    """``fields`` for Lhotse's ``SharWriter``: the recording and one array field per teacher role."""
    return {"recording": SHAR_AUDIO_FORMAT, **{token_field(r): SHAR_ARRAY_FORMAT for r in roles}}
