"""Models: a language model from a layout (``lm``) and the autoregressive U-Net over bytes (``aunet``)."""

from __future__ import annotations

import torch

from strata.config import AUNetConfig, Config, ModelConfig
from strata.models.aunet import AUNet
from strata.models.lm import LanguageModel


def build_model(config: Config | ModelConfig | AUNetConfig, device: str | torch.device | None = None) -> LanguageModel | AUNet:
    """The model a validated config describes (the ``model`` section or the whole file)."""
    model_config = config.model if isinstance(config, Config) else config
    with torch.device(device or "cpu"):
        return AUNet(model_config) if isinstance(model_config, AUNetConfig) else LanguageModel(model_config)


__all__ = ["AUNet", "LanguageModel", "build_model"]
