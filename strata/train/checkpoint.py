"""Checkpoints: one directory per save, written under a temporary name and renamed into place.

    RUN_DIR/checkpoints/step-000200/
        model.safetensors   weights (no pickle)
        optimizer.pt        optimiser state, tensors and numbers only (loaded with weights_only=True)
        rng.pt              torch RNG states
        state.json          step, tokens, data-loader position, trainer counters

A crash mid-save leaves only a ``.tmp-*`` directory, which is ignored and cleaned up; the newest
complete checkpoint is untouched. A save that fails (disk full, a file-size limit, no permission)
removes its temporary directory and raises a one-line CheckpointError naming the file and the
system's reason; the newest complete checkpoint is again untouched, so the run resumes from it.
Loading tries the newest first and falls back, with a warning, to older ones if it is unreadable
(a CheckpointError if none is). A distributed run's checkpoint holds ``dcp/`` (model and
optimiser as DCP shards, ``strata.train.distributed_checkpoint``) instead of ``optimizer.pt``, and
the same whole-model ``model.safetensors``, so eval and generate read either kind.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
    """``sharded``: the DCP folder of a distributed run's checkpoint; opened for training, its
    weights and optimiser state are read from there (``model`` and ``optimizer`` are then None)."""

    path: Path
    step: int
    state: dict
    model: dict[str, torch.Tensor] | None
    optimizer: dict | None
    rng: dict | None
    sharded: Path | None = None
    carried: dict[str, torch.Tensor] | None = None  # a carried training state (train.carry_state)


CARRIED = "carried.safetensors"


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
    carried: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``carried``: the tensors of a carried training state, saved beside the weights."""
    temporary = start_checkpoint(run_dir, step)
    with _writing(temporary, step, "optimizer.pt") as path:
        _torch_save(optimizer.state_dict(), path)
    if carried is not None:
        with _writing(temporary, step, CARRIED) as path:
            save_file({name: tensor.contiguous().cpu() for name, tensor in carried.items()}, str(path))
    return finish_checkpoint(temporary, step, model.state_dict(), state, keep_last)


def temporary_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is published."""
    return checkpoint_dir(run_dir) / f".tmp-step-{step:06d}"


def start_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    temporary = temporary_dir(run_dir, step)
    with _writing(temporary, step, ""):
        temporary.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    return temporary


def finish_checkpoint(temporary: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep_last: int) -> Path:
    """Add the weights, RNG states and trainer state to ``temporary``, then publish it by renaming
    and drop all but the newest ``keep_last`` checkpoints."""
    with _writing(temporary, step, "model.safetensors") as path:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}, str(path))
    with _writing(temporary, step, "rng.pt") as path:
        _torch_save(_rng_states(), path)
    with _writing(temporary, step, "state.json") as path:
        path.write_text(json.dumps({"step": step, **state}, indent=1))
    _fsync_dir(temporary)
    final = temporary.parent / f"step-{step:06d}"
    with _writing(temporary, step, ""):
        if final.exists():  # re-saving the same step (e.g. at the end after a periodic save)
            # Set aside, not deleted, until the new one is in place.
            aside = final.with_name(f".old-{final.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(temporary, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temporary, final)
    _fsync_dir(temporary.parent)
    for old in list_checkpoints(temporary.parent.parent)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, with_training_state: bool = True) -> Checkpoint:
    """Read one checkpoint directory; raise CheckpointError naming the file that is bad."""
    path = Path(path)
    sharded = path / "dcp" if (path / "dcp").is_dir() else None
    reading = path / "state.json"  # the file being read, for the message
    try:
        state = json.loads(reading.read_text())
        step = int(state["step"])
        model = optimizer = rng = carried = None
        if not (with_training_state and sharded):
            reading = path / "model.safetensors"
            model = load_file(str(reading))
        if with_training_state:
            reading = path / "rng.pt"
            rng = torch.load(reading, map_location="cpu", weights_only=True)
            reading = path / CARRIED
            carried = load_file(str(reading)) if reading.exists() else None
            if sharded is None:
                reading = path / "optimizer.pt"
                optimizer = torch.load(reading, map_location="cpu", weights_only=True)
            else:
                reading = sharded / ".metadata"
                reading.stat()  # the shards themselves are read when loaded into a model
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing {Path(error.filename or reading).name}") from None
    except (json.JSONDecodeError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else "no detail"
        raise CheckpointError(f"{reading}: unreadable ({type(error).__name__}: {reason})") from None
    return Checkpoint(path, step, state, model, optimizer, rng, sharded if with_training_state else None,
                      carried if with_training_state else None)


def latest_checkpoint(run_dir: Path, with_training_state: bool = True) -> Checkpoint | None:
    """The newest readable checkpoint of a run, warning about each newer one that is broken; None
    if the run has none. If it has some but none is readable, a CheckpointError names the oldest's
    problem (the newer ones' were warned about)."""
    candidates = list_checkpoints(run_dir)
    for index, path in enumerate(candidates):
        try:
            return load_checkpoint(path, with_training_state)
        except CheckpointError as error:
            if index + 1 == len(candidates):
                raise CheckpointError(f"{error}; {Path(run_dir)} has no older checkpoint to fall back to") from None
            warnings.warn(f"{error}; falling back to the previous checkpoint ({candidates[index + 1].name})", stacklevel=2)
    return None


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights, or explain in one line why they belong to another architecture."""
    check_shapes({name: tensor.shape for name, tensor in model.state_dict().items()},
                 {name: tensor.shape for name, tensor in weights.items()}, source)
    model.load_state_dict(weights)


def check_shapes(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: Path) -> None:
    """Raise CheckpointError unless ``found`` has exactly the names and shapes the model expects."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{name} {tuple(found[name])} vs {tuple(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
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


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


@contextmanager
def _writing(temporary: Path, step: int, name: str) -> Iterator[Path]:
    """Write ``temporary / name``; if that fails (disk full, a file-size limit, no permission),
    remove the temporary checkpoint and raise a CheckpointError naming the file and the reason."""
    path = temporary / name if name else temporary
    try:
        yield path
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(temporary.parent.parent)
        kept = (f"the newest complete checkpoint, {previous[0].name}, is intact" if previous
                else "there is no earlier checkpoint")
        raise CheckpointError(f"{path}: cannot save the checkpoint of step {step} ({write_failure(error)}); {kept}") from None


def write_failure(error: BaseException) -> str:
    """Why a write failed, in the operating system's words ("No space left on device") when the
    error carries them: an OSError, one that torch's writer hit first, or safetensors' "os error N"."""
    for candidate in (error, error.__cause__, error.__context__):
        if isinstance(candidate, OSError) and candidate.strerror:
            return candidate.strerror
    code = re.search(r"os error (\d+)", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write leaves its OSError (and errno)
    as the context of torch's RuntimeError."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


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
