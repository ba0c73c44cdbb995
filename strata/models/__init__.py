"""Models: a language model from a layout (``lm``) and the autoregressive U-Net over bytes (``aunet``).

``build_model(config, device="meta")`` allocates nothing; ``to_empty`` then ``init_weights``
(``strata.models.init``) fills such a model as a build on that device would have."""

from __future__ import annotations

import torch

from strata.config import AUNetConfig, Config, ModelConfig
from strata.models.aunet import AUNet
from strata.models.init import init_weights
from strata.models.lm import LanguageModel


def build_model(config: Config | ModelConfig | AUNetConfig, device: str | torch.device | None = None) -> LanguageModel | AUNet:
    """The model a validated config describes (the ``model`` section or the whole file), built on
    ``device`` (the CPU by default); on ``meta`` it has shapes and no memory."""
    model_config = config.model if isinstance(config, Config) else config
    with torch.device(device or "cpu"):
        return AUNet(model_config) if isinstance(model_config, AUNetConfig) else LanguageModel(model_config)


__all__ = ["AUNet", "LanguageModel", "build_model", "init_weights"]
