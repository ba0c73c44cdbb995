"""Parallelism applied from outside the model: processes, DDP or FSDP2, recompute and compile per block.

``torchrun`` starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK; ``session``
reads them, joins the process group (gloo on CPU, NCCL on CUDA) and describes this process as a
``World``. Without them the run is one plain process and every helper here is a no-op.

The model stays a plain ``nn.Module``. ``parallelize`` works on its blocks (``Block``, which every
family is built from, AU-Net's stages included) and on the whole, and keeps parameter names those
of the plain model, so checkpoints do not depend on the wrapping. Every rank walks the same global
batch order and trains on its own rows of each batch (``TokenLoader.next_batch``); DDP and FSDP
average gradients over the ranks, which, with equal rows on every rank, is the gradient of the
global batch's mean loss: 1, 2 or 8 processes take the same steps.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from strata.config import ConfigError, TrainConfig
from strata.models import init_weights
from strata.models.lm import Block
from strata.nn.mlp import moe_layers

# The kinds of device a run may name in train.device (besides auto).
DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is a GPU when there is one, else the CPU; a GPU without an index is this process's.
    A device this machine does not have stops with a ConfigError that lists the ones it has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_KINDS:
        raise ConfigError(f"train.device: {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps or xpu); "
                          f"this machine has {machine_devices()}")
    if device.type in ("cuda", "xpu") and device.index is None:
        device = torch.device(device.type, local_rank)
    indexed = device.type in ("cuda", "xpu")  # cpu and mps are one device each
    if (str(device) if indexed else device.type) not in machine_devices().split(", ") or (not indexed and device.index):
        which = f" (local rank {local_rank}'s)" if name in ("cuda", "xpu") and local_rank else ""
        raise ConfigError(f"train.device: {name!r}{which} is not a device of this machine, which has {machine_devices()}")
    return device


def machine_devices() -> str:
    """The devices a run can use here, e.g. ``cpu, cuda:0, cuda:1``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{index}" for index in range(xpu.device_count())]
    return ", ".join(found)


@dataclass(frozen=True)
class World:
    """This process among the run's processes; ``World()`` is a plain single-process run."""

    rank: int = 0
    size: int = 1
    parallel: str = "none"  # none | ddp | fsdp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, the metrics and the progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.size

    def any(self, *flags: bool) -> list[bool]:
        """Each flag made true on every rank if it is true on one: decisions such as stopping now,
        which every rank must take at the same step or the next collective would wait forever."""
        if not self.distributed:
            return list(flags)
        votes = torch.tensor(flags, dtype=torch.int32, device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return [bool(vote) for vote in votes.tolist()]


@contextmanager
def session(train: TrainConfig) -> Iterator[World]:
    """This process's ``World`` for the length of a run: joins the process group when torchrun
    started several processes, and leaves it afterwards."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(train.device, local_rank)
    if size == 1:
        yield World(device=device)
        return
    parallel = "ddp" if train.parallel == "auto" else train.parallel
    if parallel == "none":
        raise ConfigError(f"train.parallel: 'none' trains in one process, but {size} were started; use ddp or fsdp")
    if train.batch_size % size:
        raise ConfigError(f"train.batch_size: {train.batch_size} (the global batch) does not split evenly among "
                          f"{size} processes; use a multiple of {size}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The timeout bounds how long a rank waits in a collective for a peer that died or hangs.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=train.dist_timeout),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield World(rank, size, parallel, device)
    finally:
        dist.destroy_process_group()


def parallelize(model: nn.Module, world: World, train: TrainConfig, bf16: bool) -> nn.Module:
    """Apply recompute and compile to every block and DDP or FSDP2 to ``model``; return what the
    training step calls (``model`` itself, changed in place, except under DDP).

    A model built on the meta device (``build_model(config, device="meta")``) is materialised on
    ``world.device`` and filled by ``init_weights`` from the random generator's state (seeded
    alike on every rank), which gives the weights a build on that device would have had. Under
    FSDP this happens after sharding, so a rank allocates only its shards (and one whole tensor
    at a time while drawing it: ``strata.models.init``)."""
    on_meta = any(param.is_meta for param in model.parameters())
    # Frozen weights (an AU-Net's entropy model) never train: they are neither wrapped nor sharded,
    # so every rank holds them whole, as the code that scores with them reads them.
    frozen = {param for param in model.parameters() if not param.requires_grad}
    blocks = [module for module in model.modules()
              if isinstance(module, Block) and any(param.requires_grad for param in module.parameters())]
    for block in blocks:
        _wrap_training_forward(block, train.activation_checkpointing, train.compile)
    if on_meta and world.parallel != "fsdp":
        _materialize(model, world.device)
    if world.parallel == "ddp":
        # Buffers are not copied from rank 0 at every forward: the MoE token counts are per rank
        # until sync_expert_loads sums them, and every buffer then moves alike on every rank.
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers.)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        return DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None,
                                       **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    if world.parallel == "fsdp":
        # One all-gather per block in the forward and one reduce-scatter per block in the backward;
        # on a GPU the gathered weights are bf16 and gradients are reduced in fp32.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 and world.device.type == "cuda" else MixedPrecisionPolicy())
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy, ignored_params=frozen or None)
        if on_meta:
            _materialize(model, world.device)
    return model


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Storage on ``device`` for a model built on meta (its shards only, once sharded), filled as
    construction would have filled it."""
    model.to_empty(device=device)
    init_weights(model)


def _wrap_training_forward(block: nn.Module, recompute: bool, compile: bool) -> None:
    """Send the block's training calls (gradients on, no cache) through activation checkpointing
    and/or torch.compile. Validation and generation keep the plain forward: recomputing needs no
    gradients, and compiling every cache shape of a decode would cost more than it saves. The
    forward is replaced on the instance, not wrapped in a module, so parameter names stay put.

    A block's forward has side effects: RoPE fills its table on first use, MoE counts tokens per
    expert. Eager recomputation repeats them (harmless: the table is the same, and the balance
    update reads only which experts are below the mean count). Compiled, the checkpoint is traced
    inside the graph and told not to replay them; compiling inside the checkpoint instead would
    recompute with another graph than the forward used whenever the first call filled the table.
    """
    if not (recompute or compile):
        return
    plain = block.forward
    train_forward = functools.partial(checkpoint, plain, use_reentrant=False) if recompute else plain
    if compile:
        compiled = torch.compile(train_forward)

        def train_forward(x: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
            with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
                return compiled(x, segment_ids=segment_ids)

    def forward(x: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        if cache is None and torch.is_grad_enabled():
            return train_forward(x, segment_ids=segment_ids)
        return plain(x, cache=cache, segment_ids=segment_ids)

    block.forward = forward


def gradient_sync(forward: nn.Module, enabled: bool) -> AbstractContextManager:
    """A context whose backward passes reduce gradients over the ranks only when ``enabled``: the
    micro-batches of a step before its last accumulate locally."""
    if isinstance(forward, FSDPModule):
        forward.set_requires_gradient_sync(enabled)
    elif isinstance(forward, DistributedDataParallel) and not enabled:
        return forward.no_sync()
    return nullcontext()


def clip_gradients(parameters: list[nn.Parameter], max_norm: float | None) -> float:
    """The norm of the whole gradient, then the gradient scaled to at most ``max_norm`` (if set).
    Sharded (FSDP) gradients give a norm per shard, which is reduced to that of the whole."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm.item()


def sync_expert_loads(model: nn.Module, world: World) -> None:
    """Sum every MoE layer's tokens-per-expert counts over the ranks before the balance biases move,
    so each rank moves them as one process that saw the whole batch would."""
    layers = moe_layers(model)
    if not world.distributed or not layers:
        return
    counts = torch.cat([layer.tokens_per_expert for layer in layers])
    dist.all_reduce(counts)
    for layer, summed in zip(layers, counts.split([layer.n_experts for layer in layers]), strict=True):
        layer.tokens_per_expert.copy_(summed)


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process died or hung. NCCL
    raises DistError; gloo raises plain RuntimeErrors that name its transport."""
    return isinstance(error, dist.DistError) or any(
        mark in str(error) for mark in ("gloo/transport", "Connection reset by peer", "Connection closed by peer")
    )
