"""strata: hybrid attention + Mamba-2 and byte-level hierarchical language models.

The model exports are loaded on first use, so torch-free commands (``strata info``) start fast.
"""

from strata.config import Config, ConfigError, load_config
from strata.layout import make_layout

__all__ = ["AUNet", "Config", "ConfigError", "LanguageModel", "build_model", "from_pretrained", "generate", "load_config",
           "make_layout"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("AUNet", "LanguageModel", "build_model"):
        import strata.models

        return getattr(strata.models, name)
    if name == "from_pretrained":
        from strata.train.runs import from_pretrained

        return from_pretrained
    if name == "generate":
        from strata.inference.generate import generate

        return generate
    raise AttributeError(f"module 'strata' has no attribute {name!r}")
