"""Typed, validated configuration: YAML files plus ``key.sub=value`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo stops the run with the key's
dotted path. Sizes that must agree (heads dividing widths, a section per layout symbol) are checked
here, once, instead of failing deep inside a module.

    base      the sections' base class and the errors
    blocks    attention, Mamba-2, Gated DeltaNet, Kimi Delta Attention, the intra-layer hybrid, FFN, MoE
    model     a stack of blocks from its layout: a language model, an AU-Net stage
    aunet     the AU-Net and where it splits
    run       a whole file: model, data, training
    loading   YAML, overrides, validation and one-line errors, back to plain data
"""

from strata.config.aunet import AUNetConfig, SplitConfig
from strata.config.base import ConfigError, Strict
from strata.config.blocks import (
    AttentionConfig,
    FFNConfig,
    GatedDeltaNetConfig,
    HybridConfig,
    KimiDeltaConfig,
    Mamba2Config,
    MoEConfig,
    RopeConfig,
    RopeScaling,
    SlidingWindowConfig,
)
from strata.config.loading import (
    apply_override,
    config_to_dict,
    load_config,
    read_yaml,
    set_key,
    validate_config,
)
from strata.config.model import LayoutSpec, ModelConfig, StackConfig, StageConfig
from strata.config.run import Config, DataConfig, HFTokenizerConfig, TrainConfig

__all__ = [
    "AUNetConfig", "AttentionConfig", "Config", "ConfigError", "DataConfig", "FFNConfig", "GatedDeltaNetConfig",
    "HFTokenizerConfig", "HybridConfig", "KimiDeltaConfig", "LayoutSpec", "Mamba2Config", "MoEConfig", "ModelConfig", "RopeConfig",
    "RopeScaling", "SlidingWindowConfig", "SplitConfig", "StackConfig", "StageConfig", "Strict", "TrainConfig",
    "apply_override", "config_to_dict", "load_config", "read_yaml", "set_key", "validate_config",
]
