"""Student encoders (Zipformer2, Transformer/Conformer) and the masked multi-codebook prediction objective.

Pure torch (no Ray, no storage, no config). One training step, as the Ray Train loop composes it::

    wavs, targets = mix_batch(wavs, wav_lengths, targets, frame_rates, domains, gen, prob=0.4)[:2]
    feats, feat_lens = KaldiFbank(128)(wavs, wav_lengths)                  # spear.models.frontend
    masked = mask_features(feats, feat_lens, generator=gen)                # channel mask applied, span mask returned
    student_lens = encoder.output_lengths(feat_lens)
    aligned = {t: align_targets(targets[t], teacher_lens[t], frame_rates[t], encoder.frame_rate, student_lens)
               for t in targets}
    out = objective(masked.feats, feat_lens, aligned, frame_mask=masked.frame_mask)
    out.loss.backward()

Modules: :mod:`.base` (the encoder interface), :mod:`.configs`, :mod:`.encoder` (presets, factory),
:mod:`.zipformer`, :mod:`.transformer`, :mod:`.masking`, :mod:`.mixing`, :mod:`.targets`, :mod:`.loss`,
:mod:`.export` (a standalone student from / to plain weights and config; storage is
:mod:`spear.stages.artefacts`).
"""

from .base import EncoderOutput, StudentEncoder
from .configs import ARCHITECTURES, TransformerConfig, ZipformerConfig, config_from_dict, config_to_dict
from .encoder import PRESETS, SIZES, build_encoder, encoder_config
from .export import StudentFeatures, StudentModel, build_student, export_fields, export_state
from .loss import (
    AccuracyCounts,
    ObjectiveOutput,
    PredictionHead,
    SpearObjective,
    TeacherLoss,
    asymmetric_loss,
    codebook_accuracy,
    multi_codebook_ce,
)
from .masking import MaskedFeatures, channel_mask, mask_features, span_mask
from .mixing import MixInfo, mix_batch
from .targets import (
    IGNORE_INDEX,
    TargetAlignmentError,
    align_targets,
    has_any_target,
    converted_lengths,
    ignore_utterances,
    rate_factor,
    student_codebooks,
)

__all__ = [
    "ARCHITECTURES", "PRESETS", "SIZES", "EncoderOutput", "StudentEncoder", "TransformerConfig", "ZipformerConfig",
    "build_encoder", "config_from_dict", "config_to_dict", "encoder_config",
    "StudentFeatures", "StudentModel", "build_student", "export_fields", "export_state",
    "AccuracyCounts", "ObjectiveOutput", "PredictionHead", "SpearObjective", "TeacherLoss", "asymmetric_loss",
    "codebook_accuracy", "multi_codebook_ce",
    "MaskedFeatures", "channel_mask", "mask_features", "span_mask",
    "MixInfo", "mix_batch",
    "IGNORE_INDEX", "TargetAlignmentError", "align_targets", "converted_lengths", "ignore_utterances", "rate_factor",
    "student_codebooks", "has_any_target",
]
