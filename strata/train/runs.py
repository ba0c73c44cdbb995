"""Opening a model for evaluation, generation and fine-tuning: a strata run, one of its
checkpoints, or a Hugging Face (or mamba_ssm) model directory (``from_pretrained``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import yaml

from strata.config import Config, config_to_dict, load_config, validate_config
from strata.data import ByteTokenizer, Tokenizer, load_hf_tokenizer, load_tokenizer
from strata.interop.pretrained import is_hf_directory, load_hf, read_hf_config
from strata.models import build_model
from strata.train.checkpoint import (
    CheckpointError,
    finish_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    start_checkpoint,
)


@dataclass
class TrainedModel:
    config: Config
    model: nn.Module
    tokenizer: Tokenizer | None  # None: an HF directory without a tokenizer
    checkpoint: Path
    family: str = "strata"  # the HF architecture an imported model came as


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> TrainedModel:
    """The model (in eval mode), tokenizer and config at ``path``: a strata run directory (its newest
    readable checkpoint), a strata checkpoint, or a Hugging Face or mamba_ssm model directory
    (``strata.interop.pretrained``). Floating weights take ``dtype`` (or its name); by default a run keeps its
    own and an HF checkpoint loads as float32 on a CPU, in its own dtype elsewhere."""
    path = Path(path).expanduser()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if is_hf_directory(path):
        imported = load_hf(path, dtype, device)
        return TrainedModel(imported.config, imported.model, imported.tokenizer, path, imported.family)
    trained = open_run(path, device)
    if dtype is not None:
        trained.model.to(dtype)
    return trained


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


def pretrained_config(path: str | Path) -> Config:
    """The config of what ``from_pretrained(path)`` opens, read without loading any weights."""
    path = Path(path).expanduser()
    if is_hf_directory(path):
        return read_hf_config(path)[2]
    return load_config(_run_dir(path) / "config.yaml")


def pretrained_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored with what ``from_pretrained(path)`` opens."""
    path = Path(path).expanduser()
    if is_hf_directory(path):
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: has no tokenizer.json; strata needs the model's tokenizer beside it")
        return load_hf_tokenizer(path)
    return load_tokenizer(_run_dir(path))


def _run_dir(path: Path) -> Path:
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{path}: neither a run directory (config.yaml), a checkpoint, nor a Hugging Face "
                              "model directory (config.json)")
    return run_dir


def fine_tuning_config(config: Config, source: str | Path) -> Config:
    """``config`` set to fine-tune what ``source`` holds (``strata train CONFIG --init-from DIR``):
    its model section and tokenizer become the source's, ``train.init_from`` names it, and the
    data and training settings stay ``config``'s."""
    pretrained = pretrained_config(source)
    data = config_to_dict(config)
    data["model"] = config_to_dict(pretrained)["model"]
    data["data"]["tokenizer"] = config_to_dict(pretrained)["data"]["tokenizer"]
    data["train"]["init_from"] = str(Path(source).expanduser())
    return validate_config(data, f"{source} (--init-from)")


def save_as_run(trained: TrainedModel, out: str | Path) -> Path:
    """Write ``trained`` as a strata run directory (config.yaml, tokenizer, one checkpoint of its
    weights at step 0) that every command taking a run opens, and ``--init-from`` fine-tunes."""
    out = Path(out)
    if (out / "config.yaml").exists():
        raise CheckpointError(f"{out}: already holds a run; choose a new directory")
    if trained.tokenizer is None:
        raise CheckpointError(f"{trained.checkpoint}: has no tokenizer to give the run (a tokenizer.json beside "
                              "config.json); a strata run needs one")
    out.mkdir(parents=True, exist_ok=True)
    config = trained.config
    if not isinstance(trained.tokenizer, ByteTokenizer):  # the run reads the tokenizer it saves
        data = config_to_dict(config)
        data["data"]["tokenizer"] = {"kind": "hf", "path": str(out)}
        config = validate_config(data, str(out / "config.yaml"))
    trained.tokenizer.save(out)
    temporary = start_checkpoint(out, 0)
    finish_checkpoint(temporary, 0, trained.model.state_dict(), {"converted_from": str(trained.checkpoint)}, keep_last=1)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return out
