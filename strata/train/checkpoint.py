"""Checkpoints: one directory per save, written under a temporary name and renamed into place.

    RUN_DIR/checkpoints/step-000200/
        model.safetensors   weights (no pickle)
        optimizer.pt        optimiser state, tensors and numbers only (loaded with weights_only=True)
        rng.pt              torch RNG states
        state.json          step, tokens, data-loader position, trainer counters

A crash mid-save leaves only a ``.tmp-*`` directory, which is ignored and cleaned up; the newest
complete checkpoint is untouched. Loading tries the newest first and falls back, with a warning,
to older ones if it is unreadable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the model; the message says which and why."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    model: dict[str, torch.Tensor]
    optimizer: dict | None
    rng: dict | None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep_last: int,
) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    temporary = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(weights, str(temporary / "model.safetensors"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(_rng_states(), temporary / "rng.pt")
    (temporary / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    _fsync_dir(temporary)
    if final.exists():  # re-saving the same step (e.g. at the end after a periodic save)
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, with_training_state: bool = True) -> Checkpoint:
    """Read one checkpoint directory; raise CheckpointError naming the file that is bad."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        optimizer = rng = None
        if with_training_state:
            optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing {Path(error.filename).name}") from None
    except (json.JSONDecodeError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    return Checkpoint(path, int(state["step"]), state, model, optimizer, rng)


def latest_checkpoint(run_dir: Path, with_training_state: bool = True) -> Checkpoint | None:
    """The newest readable checkpoint of a run, warning about each newer one that is broken."""
    candidates = list_checkpoints(run_dir)
    for index, path in enumerate(candidates):
        try:
            return load_checkpoint(path, with_training_state)
        except CheckpointError as error:
            fallback = candidates[index + 1].name if index + 1 < len(candidates) else "none left"
            warnings.warn(f"{error}; falling back to the previous checkpoint ({fallback})", stacklevel=2)
    return None


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights, or explain in one line why they belong to another architecture."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{name} {tuple(weights[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in weights and weights[name].shape != tensor.shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shape {', '.join(mismatched[:3])}" if mismatched else "",
            )
            if part
        )
        raise CheckpointError(f"{source}: written by a different architecture than the config ({details})")
    model.load_state_dict(weights)


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries durable before the rename that publishes them (POSIX)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
