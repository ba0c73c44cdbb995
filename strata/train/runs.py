"""Opening a trained run (or one of its checkpoints) for evaluation and generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from strata.config import Config, load_config
from strata.data import Tokenizer, load_tokenizer
from strata.models import build_model
from strata.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
)


@dataclass
class TrainedModel:
    config: Config
    model: nn.Module
    tokenizer: Tokenizer
    checkpoint: Path


def open_run(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """``path`` is a run directory (its newest readable checkpoint is used) or a checkpoint directory."""
    path = Path(path)
    if (path / "model.safetensors").exists() and path.parent.name == "checkpoints":
        run_dir, checkpoint = path.parent.parent, load_checkpoint(path, with_training_state=False)
    elif (path / "config.yaml").exists():
        run_dir, checkpoint = path, latest_checkpoint(path, with_training_state=False)
        if checkpoint is None:
            raise CheckpointError(f"{path}: the run has no checkpoint yet")
    else:
        raise CheckpointError(f"{path}: neither a run directory (config.yaml) nor a checkpoint (model.safetensors)")
    config = load_config(run_dir / "config.yaml")
    model = build_model(config, device=device)
    load_model_weights(model, checkpoint.model, checkpoint.path)
    model.eval()
    return TrainedModel(config, model, load_tokenizer(run_dir), checkpoint.path)
