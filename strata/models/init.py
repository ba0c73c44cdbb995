"""Initialisation apart from construction: build on the meta device, then fill.

``build_model(config, device="meta")`` allocates nothing; after ``model.to_empty(device=...)``,
``init_weights(model)`` fills every parameter and buffer as construction would have, from the
random generator's state it finds: ``torch.manual_seed(s); build_model(config)`` and
``torch.manual_seed(s)``, a meta build, ``to_empty`` and ``init_weights`` give the same weights,
bit for bit, on the same kind of device.

Construction and ``init_weights`` run one code path. Every module that initialises its own
parameters or buffers does it in ``reset_parameters`` (torch's Linear, Conv1d and Embedding, and
strata's norms, Mamba-2, the hybrid's scalings, MoE's biases, RoPE's frequencies, the
upsampler's offsets) and calls it where its ``__init__`` always initialised them; the model's
``reset_parameters`` (last) draws the scaled normal initialisation of embeddings and projections.
``init_weights`` calls them in the order construction does, which is the order the random
numbers are drawn in: a module after its children, except the children a module names in
``built_after_reset`` (built after its own parameters were drawn).

Sharded parameters (FSDP2's DTensors) are filled one whole tensor at a time: ``whole_parameters``
lends a module plain full-size tensors on the shard's device, its ``reset_parameters`` fills
them, and each rank keeps its shard. Every rank draws the same numbers (the same seed, the same
order), so the shards together are the weights one process would have, and no rank holds more
than one whole tensor beside its shards.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    """(Re)initialise every parameter and buffer of ``model`` in place, on whatever device they
    are, exactly as construction does from the random generator's current state."""
    with torch.no_grad():
        for module in construction_order(model):
            reset = getattr(module, "reset_parameters", None)
            if reset is not None:
                with whole_parameters(module):
                    reset()


def construction_order(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and its descendants in the order their ``reset_parameters`` run when it is built:
    children (in the order they were built, which is the order they were registered) before the
    module, except those named in its ``built_after_reset``, which come after it."""
    later = getattr(module, "built_after_reset", ())
    for name, child in module.named_children():
        if name not in later:
            yield from construction_order(child)
    yield module
    for name, child in module.named_children():
        if name in later:
            yield from construction_order(child)


def _is_sharded(tensor: torch.Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor has been imported; not importing it here
    # keeps it out of every plain model build.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


@contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """Within: ``module``'s own sharded parameters (DTensors) are plain full-size tensors on the
    shard's device; on leaving, each rank copies its shard of what was written into its DTensor
    and the DTensors are back. Plain parameters are left as they are."""
    lent = {name: param for name, param in module.named_parameters(recurse=False) if _is_sharded(param)}
    if not lent:
        yield
        return
    from torch.distributed.tensor import distribute_tensor

    for name, param in lent.items():
        module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=param.device),
                                                requires_grad=param.requires_grad)
    try:
        yield
        with torch.no_grad():
            for name, param in lent.items():
                # No collective: with src_data_rank=None each rank cuts its own shard of its own copy.
                shard = distribute_tensor(module._parameters[name].detach(), param.device_mesh, param.placements,
                                          src_data_rank=None)
                param.to_local().copy_(shard.to_local())
    finally:
        module._parameters.update(lent)
