"""The entropy rule's byte model in a training run (``split: {rule: entropy}``, ``strata.models.entropy``).

A new AU-Net run reads the byte model's architecture from its run (``with_byte_model``: written
into the AU-Net run's config, so the run opens without the byte model's) and copies its trained
weights into the AU-Net's frozen ``entropy`` submodule (``copy_byte_model``); from then on every
checkpoint of the AU-Net carries them, and a resumed run takes them from its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from strata.config import AUNetConfig, Config, ConfigError, config_to_dict, validate_config
from strata.data import ByteTokenizer
from strata.data.splitter import Splitter
from strata.models.entropy import EntropyModel
from strata.train.checkpoint import CheckpointError, load_model_weights
from strata.train.runs import open_run


def uses_entropy_model(config: Config) -> bool:
    return isinstance(config.model, AUNetConfig) and config.model.split.rule == "entropy"


def with_byte_model(config: Config) -> Config:
    """``config`` with ``model.split.byte_model`` set to the architecture of the run at
    ``model.split.model`` (unchanged when already set or for another rule)."""
    if not uses_entropy_model(config) or config.model.split.byte_model is not None:
        return config
    data = config_to_dict(config)
    data["model"]["split"]["byte_model"] = config.model.split.entropy_model_config().model_dump(mode="json")
    return validate_config(data, "<config>")


def copy_byte_model(entropy: EntropyModel, source: str | Path) -> None:
    """The trained weights of the byte model at ``source`` (a run directory or checkpoint) into
    ``entropy`` (an AU-Net's ``entropy``); a one-line error when they are not a byte model of its
    shape."""
    try:
        trained = open_run(source)
    except CheckpointError as error:
        raise CheckpointError(f"model.split.model: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"model.split.model: {source}: {error}") from None
    if not isinstance(trained.tokenizer, ByteTokenizer):
        raise ConfigError(f"model.split.model: {source} is not a byte-level model (data.tokenizer: bytes)")
    load_model_weights(entropy.lm, trained.model.state_dict(), trained.checkpoint)


def entropy_splitter(config: AUNetConfig, run: str | Path | None = None) -> Splitter | None:
    """The entropy rule's splitter with trained weights: those in the AU-Net run (or checkpoint)
    ``run`` when given, else the byte model's at ``split.model``; None when the byte model has no
    run to open yet (then costs assume a contraction)."""
    if run is not None:
        return open_run(run).model.splitter
    try:
        architecture = config.split.entropy_model_config()
    except ConfigError:
        return None
    entropy = EntropyModel(architecture, config.split.window)
    copy_byte_model(entropy, config.split.model)
    return entropy.splitter(config)
