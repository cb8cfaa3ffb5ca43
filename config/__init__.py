"""Typed, validated configuration for every SPEAR job (the YAML file and ``--set`` overrides).

:mod:`spear.config.settings` holds the sections, :mod:`spear.config.loading` reads and writes
them. Both sit below stages/ so that a stage can take its typed section as an argument.

Example::

    >>> from spear.config import load_config
    >>> cfg = load_config(None, overrides=["decode.max_segment_seconds=10"])
    >>> cfg.decode.max_segment_seconds
    10.0
"""

from spear.config.loading import (secret_fields, secret_values, mask_override, describe_validation_error, load_config, config_to_dict, dump_config, commented_default_config)
from spear.config.settings import (Domain, AUDIO_EXTENSIONS, ConfigError, ConfigLoader, load_yaml, WORKERS_EXPECTED, parse_workers, StorageConfig, RayConfig, SourceConfig, CorpusConfig, DecodeConfig, TeacherKind, TeacherConfig, TeachersConfig, MVQConfig, TokenizeConfig, StudentConfig, MaskingConfig, MixingConfig, TrainConfig, EvaluateConfig, AttributeConfig, PostTrainConfig, COUNTING_TASK_NAMES, SpearConfig)

__all__ = ['AUDIO_EXTENSIONS', 'ConfigError', 'ConfigLoader', 'CorpusConfig', 'DecodeConfig', 'Domain', 'EvaluateConfig', 'AttributeConfig', 'PostTrainConfig', 'COUNTING_TASK_NAMES', 'MVQConfig', 'MaskingConfig', 'MixingConfig', 'RayConfig', 'SourceConfig', 'SpearConfig', 'StorageConfig', 'StudentConfig', 'TeacherConfig', 'TeacherKind', 'TeachersConfig', 'TokenizeConfig', 'TrainConfig', 'WORKERS_EXPECTED', 'commented_default_config', 'config_to_dict', 'describe_validation_error', 'dump_config', 'load_config', 'load_yaml', 'mask_override', 'parse_workers', 'secret_fields', 'secret_values']
