"""Student encoders (Zipformer2, Transformer/Conformer) and the masked multi-codebook prediction objective.

Pure torch (no Ray). One training step, as the Ray Train loop composes it::

    wavs, targets = mix_batch(wavs, wav_lengths, targets, frame_rates, domains, cfg.mixing, gen)[:2]
    feats, feat_lens = KaldiFbank(128)(wavs, wav_lengths)                  # spear.models.frontend
    masked = mask_features(feats, feat_lens, cfg.masking, gen)             # channel mask applied, span mask returned
    student_lens = encoder.output_lengths(feat_lens)
    aligned = {t: align_targets(targets[t], teacher_lens[t], frame_rates[t], encoder.frame_rate, student_lens)
               for t in targets}
    out = objective(masked.feats, feat_lens, aligned, frame_mask=masked.frame_mask)
    out.loss.backward()

Modules: :mod:`.encoder` (interface, presets, factory), :mod:`.zipformer`, :mod:`.transformer`,
:mod:`.masking`, :mod:`.mixing`, :mod:`.targets`, :mod:`.loss`, :mod:`.export`.
"""

from .encoder import (
    ARCHITECTURES,
    PRESETS,
    SIZES,
    EncoderOutput,
    StudentEncoder,
    TransformerConfig,
    ZipformerConfig,
    build_encoder,
    config_from_dict,
    config_to_dict,
    encoder_config,
)
from .export import StudentFeatures, StudentModel, export_student, load_student
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
    converted_lengths,
    ignore_utterances,
    rate_factor,
    student_codebooks,
)

__all__ = [
    "ARCHITECTURES", "PRESETS", "SIZES", "EncoderOutput", "StudentEncoder", "TransformerConfig", "ZipformerConfig",
    "build_encoder", "config_from_dict", "config_to_dict", "encoder_config",
    "StudentFeatures", "StudentModel", "export_student", "load_student",
    "AccuracyCounts", "ObjectiveOutput", "PredictionHead", "SpearObjective", "TeacherLoss", "asymmetric_loss",
    "codebook_accuracy", "multi_codebook_ce",
    "MaskedFeatures", "channel_mask", "mask_features", "span_mask",
    "MixInfo", "mix_batch",
    "IGNORE_INDEX", "TargetAlignmentError", "align_targets", "converted_lengths", "ignore_utterances", "rate_factor",
    "student_codebooks",
]
