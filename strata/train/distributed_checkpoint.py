"""Checkpoints of a distributed run: DCP shards that load again at any number of processes.

    RUN_DIR/checkpoints/step-000200/
        dcp/                weights and optimiser state as ``torch.distributed.checkpoint`` shards
        model.safetensors   the whole weights, gathered on rank 0 (for eval, generate, inspection)
        rng.pt, state.json  as in a single-process checkpoint (``strata.train.checkpoint``)

The shards hold the state dicts of ``torch.distributed.checkpoint.state_dict``, whose tensors are
named by parameter (``blocks.3.mixer.q_proj.weight``, ``optimizer.<same>.exp_avg``), not by rank
or shard, so DCP reshards on load: a checkpoint of 2 FSDP processes continues in 1 plain process
or under 4 DDP ones. A single-process checkpoint continues under torchrun too (``load_whole``).
Every rank writes its shards into the temporary directory; rank 0 publishes it by renaming once
all have finished, so the newest checkpoint is always complete.

Safety: only tensors go into the shards (the optimiser's hyperparameters come from the config,
and the learning rate is set every step), and DCP's metadata file, a pickle, is first read with
an unpickler that admits only the classes DCP metadata is made of. So nothing in a checkpoint can
run code, and every tensor is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from strata.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_shapes,
    finish_checkpoint,
    start_checkpoint,
    temporary_dir,
)
from strata.train.distributed import World

_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = {
    (_METADATA, name)
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                 "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


def save_sharded(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 keep_last: int, world: World) -> Path:
    """Save on every rank (a collective); returns the published checkpoint directory."""
    temporary = start_checkpoint(run_dir, step) if world.is_main else temporary_dir(run_dir, step)
    world.barrier()  # the directory exists before anyone writes into it
    weights, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optimizer_state["state"]}, checkpoint_id=temporary / "dcp")
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = temporary.parent / f"step-{step:06d}"
    if world.is_main:  # dcp.save returns on every rank once all shards and the metadata are written
        finish_checkpoint(temporary, step, whole, state, keep_last)
    world.barrier()  # nobody goes on (or reads the checkpoint) before it is published
    return final


def load_sharded(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Load a distributed checkpoint's shards into this run's model and optimiser, however many
    processes wrote them and however this run is sharded."""
    folder = checkpoint.sharded
    metadata = read_metadata(folder)
    weights, optimizer_state = get_state_dict(model, optimizer)
    saved = {key.removeprefix("model."): meta.size for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.")}
    check_shapes({name: tensor.shape for name, tensor in weights.items()}, saved, checkpoint.path)
    try:
        with warnings.catch_warnings():  # DCP warns that a single process is loading, which is intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"model": weights, "optimizer": optimizer_state["state"]}, checkpoint_id=folder,
                     no_dist=not world.distributed)
    except Exception as error:  # DCP wraps every rank's failure in one CheckpointException
        raise CheckpointError(f"{folder}: unreadable shards ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state)


def load_whole(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a single-process checkpoint (whole weights, ``optimizer.pt`` numbered by parameter)
    into a distributed run's model and optimiser; every rank reads the files and keeps its part."""
    load_whole_weights(model, checkpoint.model, checkpoint.path)
    # optimizer.pt numbers parameters in the order of the optimiser's groups, which are built the
    # same way from the same model in every run; the state-dict API wants them by name.
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    order = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    saved = checkpoint.optimizer
    by_name = {
        "state": {order[index]: value for index, value in saved["state"].items()},
        "param_groups": [{**group, "params": [order[index] for index in group["params"]]} for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_whole_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Whole weights (every rank holds them all) into a distributed run's model, each rank keeping
    its part; a one-line error naming ``source`` when they are another architecture's."""
    check_shapes({name: tensor.shape for name, tensor in get_model_state_dict(model).items()},
                 {name: tensor.shape for name, tensor in weights.items()}, source)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_CLASSES and not is_dtype:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which checkpoint metadata never needs")
        return super().find_class(module, name)


def read_metadata(folder: Path):
    """DCP's metadata of the shards in ``folder``, read without running anything but its own classes."""
    try:
        with open(Path(folder) / ".metadata", "rb") as stream:
            return _MetadataUnpickler(stream).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder}/.metadata: unreadable ({type(error).__name__}: {error})") from None
