"""strata: hybrid attention + Mamba-2 and byte-level hierarchical language models."""

from strata.config import Config, ConfigError, load_config
from strata.layout import make_layout
from strata.models.lm import LanguageModel, build_model

__all__ = ["Config", "ConfigError", "LanguageModel", "build_model", "load_config", "make_layout"]
__version__ = "0.1.0"
