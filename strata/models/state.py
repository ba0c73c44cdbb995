"""Carried state: the inference cache generalised to training.

``model(x1, state=s)`` then ``model(x2, state=s)`` computes what ``model(x1 ++ x2)`` computes,
gradients included: ``s`` holds, per block, what the next tokens need of the earlier ones, as
ordinary tensors of the autograd graph (attention: the rotated keys and the values; Mamba-2 and
Gated DeltaNet: the conv window and the recurrent state; the intra-layer hybrid: both branches'). Nothing is written in
place, so a backward pass through the second call reaches the first. ``detach()`` cuts the graph
(truncated backpropagation through time keeps the values and drops the history).

An AU-Net's (``AUNetCarriedState``) speaks the protocol of its decoding cache
(``strata.inference.aunet_cache``) with carried states for its stacks: per row, the split rule's
incremental state and, per deeper stage, its stacks' states and the segment its last output opened.

It speaks the cache protocol the mixers already follow (``strata.inference.cache``): attention
asks ``sequence.rope`` for its positions and ``update(k, v)`` for the keys, values and mask to
attend over; the recurrent mixers see ``carried`` and continue their conv and scan from the held
tensors.
``max_context`` bounds the keys an attention block keeps (a sliding-window block keeps its sinks
and its window in any case): the carried KV of truncated backpropagation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from strata.data.levels import TokenLevels

from strata.nn.attention import Attention
from strata.nn.gated_deltanet import DeltaRuleMixer
from strata.nn.hybrid import IntraLayerHybrid
from strata.nn.mamba2 import Mamba2


class CarriedPositions:
    """Where the stream stands: ``offset`` steps done, ``steps`` in the forward under way."""

    def __init__(self):
        self.offset, self.steps = 0, 0

    def begin(self, steps: int, lengths: torch.Tensor | None = None) -> None:
        if lengths is not None:
            raise ValueError("a carried state continues whole rows; lengths= is for generation caches")
        self.steps = steps

    def commit(self) -> None:
        self.offset += self.steps

    def rope(self, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [1, T, 1, D] for this forward's positions."""
        cos, sin = rotary(self.steps, self.offset, device=rotary.inv_freq.device)
        return cos[None, :, None], sin[None, :, None]


class CarriedKV:
    """An attention block's keys (rotated) and values so far, with their positions."""

    carried = True

    def __init__(self, attention: Attention, sequence: CarriedPositions, max_context: int | None):
        self.sequence = sequence
        self.window, self.sinks = attention.window, attention.sinks
        self.max_context = max_context
        self.keys = self.values = self.positions = None

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """(keys, values, mask) to attend over: the held ones, then the new [B, kv, T, D]; the mask is
        [1, 1, T, S] (None where plain causal attention over the new steps is exact)."""
        device, steps = keys.device, keys.shape[2]
        new_positions = torch.arange(self.sequence.offset, self.sequence.offset + steps, device=device)
        if self.keys is None and (self.window is None or self.window + self.sinks >= steps):
            all_keys, all_values, positions, mask = keys, values, new_positions, None
        else:
            held = self.keys is not None
            all_keys = torch.cat([self.keys, keys], dim=2) if held else keys
            all_values = torch.cat([self.values, values], dim=2) if held else values
            positions = torch.cat([self.positions, new_positions]) if held else new_positions
            query, key = new_positions[:, None], positions[None, :]
            allowed = key <= query
            if self.window is not None:
                allowed &= (query - key < self.window) | (key < self.sinks)
            mask = allowed[None, None]
        self._keep(all_keys, all_values, positions)
        return all_keys, all_values, mask

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Hold what later steps can still see: a window's sinks and window, and at most
        ``max_context`` of the rest."""
        keep = torch.ones_like(positions, dtype=torch.bool)
        last = positions[-1]
        if self.window is not None:
            keep &= (last - positions < self.window) | (positions < self.sinks)
        if self.max_context is not None:
            keep &= (last - positions < self.max_context) | ((positions < self.sinks) if self.window else False)
        if not keep.all():
            keys, values, positions = keys[:, :, keep], values[:, :, keep], positions[keep]
        self.keys, self.values, self.positions = keys, values, positions

    def detach(self) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.detach(), self.values.detach()

    TENSORS = ("keys", "values", "positions")


class CarriedRecurrent:
    """A recurrent mixer's (Mamba-2's, Gated DeltaNet's) conv window (its last K−1 conv inputs) and
    state; None before the first step."""

    carried = True

    def __init__(self, sequence: CarriedPositions):
        self.sequence = sequence
        self.conv = self.ssm = None

    def detach(self) -> None:
        if self.conv is not None:
            self.conv, self.ssm = self.conv.detach(), self.ssm.detach()

    TENSORS = ("conv", "ssm")


class CarriedHybrid:
    carried = True

    def __init__(self, first, second):
        self.branches = (first, second)

    def detach(self) -> None:
        for branch in self.branches:
            branch.detach()


def carried_layer(mixer: nn.Module | None, sequence: CarriedPositions, max_context: int | None):
    if mixer is None:  # a feed-forward (F) block
        return None
    if isinstance(mixer, Attention):
        return CarriedKV(mixer, sequence, max_context)
    if isinstance(mixer, (Mamba2, DeltaRuleMixer)):
        return CarriedRecurrent(sequence)
    if isinstance(mixer, IntraLayerHybrid):
        return CarriedHybrid(*(carried_layer(branch, sequence, max_context) for branch in mixer.branch_modules()))
    raise TypeError(f"{type(mixer).__name__} cannot carry a state")


class CarriedState:
    """The state of a stack of blocks (a LanguageModel's) between forwards; see the module docstring."""

    holds_trailing_padding = False

    def __init__(self, blocks: nn.ModuleList, max_context: int | None = None):
        self.sequence = CarriedPositions()
        self.layers = [carried_layer(block.mixer, self.sequence, max_context) for block in blocks]

    @property
    def length(self) -> int:
        """Steps seen so far."""
        return self.sequence.offset

    def detach(self) -> CarriedState:
        """Keep the values, drop their history (the carried state of truncated backpropagation)."""
        for layer in self.layers:
            if layer is not None:
                layer.detach()
        return self

    def _holders(self):
        """(name prefix, per-mixer state) of every attention and recurrent state, hybrids' branches apart."""
        for index, layer in enumerate(self.layers):
            parts = layer.branches if isinstance(layer, CarriedHybrid) else (layer,)
            for branch, part in enumerate(parts):
                if part is not None:
                    yield f"{index}.{branch}.", part

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The held tensors (detached) and the offset, for a checkpoint."""
        out = {"offset": torch.tensor(self.sequence.offset)}
        for prefix, part in self._holders():
            out |= {prefix + name: getattr(part, name).detach() for name in part.TENSORS if getattr(part, name) is not None}
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device=None) -> None:
        self.sequence.offset = int(tensors["offset"])
        for prefix, part in self._holders():
            for name in part.TENSORS:
                value = tensors.get(prefix + name)
                setattr(part, name, None if value is None else value.to(device))


@dataclass
class CarriedStage:
    """One row's stage below an AU-Net's byte stage: its stacks' carried states (``encoder`` and
    ``decoder``, or ``trunk``) and ``carried``, the segment its latest output opened (that output
    and the finer stage's offset in it; None before its first split)."""

    encoder: CarriedState | None = None
    decoder: CarriedState | None = None
    trunk: CarriedState | None = None
    carried: tuple[torch.Tensor, torch.Tensor] | None = None
    router_key: torch.Tensor | None = None  # the learned rule's (``strata.inference.aunet_cache.StageCache``)

    def detach(self) -> None:
        for stack in (self.encoder, self.decoder, self.trunk):
            if stack is not None:
                stack.detach()
        if self.carried is not None:
            self.carried = (self.carried[0].detach(), self.carried[1])
        if self.router_key is not None:
            self.router_key = self.router_key.detach()


class AUNetCarriedState:
    """An AU-Net's carried state (see the module docstring); rows are set up by the first forward."""

    holds_trailing_padding = False

    def __init__(self, model: nn.Module, max_context: int | None = None):
        self.model, self.max_context = model, max_context
        self.byte_encoder = CarriedState(model.encoders[0], max_context)
        self.byte_decoder = CarriedState(model.decoders[0], max_context)
        self.levels: list[TokenLevels] = []
        self.deep: list[list[CarriedStage]] = []

    @property
    def sequence(self) -> CarriedPositions:
        return self.byte_encoder.sequence

    @property
    def length(self) -> int:
        return self.byte_encoder.length

    def _stage(self, depth: int) -> CarriedStage:
        model, limit = self.model, self.max_context
        if depth == model.n_stages - 1:
            return CarriedStage(trunk=CarriedState(model.trunk, limit))
        return CarriedStage(encoder=CarriedState(model.encoders[depth], limit),
                            decoder=CarriedState(model.decoders[depth], limit))

    def feed(self, tokens: torch.Tensor):
        """(row, 0, split levels [1, T] on the CPU, the row's deeper stages) for every row of
        ``tokens`` [B, T], the steps after those already seen (``AUNetCache.feed``'s protocol)."""
        if not self.levels:
            self.levels = [TokenLevels(self.model.splitter) for _ in range(tokens.shape[0])]
            self.deep = [[self._stage(depth) for depth in range(1, self.model.n_stages)] for _ in range(tokens.shape[0])]
        return [(row, 0, torch.from_numpy(self.levels[row].feed(tokens[row].tolist())[None]), self.deep[row])
                for row in range(tokens.shape[0])]

    def detach(self) -> AUNetCarriedState:
        self.byte_encoder.detach()
        self.byte_decoder.detach()
        for row in self.deep:
            for stage in row:
                stage.detach()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every held tensor, and per row the bytes the split rule has read since its stream last
        started (replayed on load, they give the rule its state back)."""
        out = {f"byte_encoder.{k}": v for k, v in self.byte_encoder.state_dict().items()}
        out |= {f"byte_decoder.{k}": v for k, v in self.byte_decoder.state_dict().items()}
        for row, (levels, stages) in enumerate(zip(self.levels, self.deep)):
            out[f"levels.{row}"] = torch.tensor(levels.since_start, dtype=torch.long)
            for depth, stage in enumerate(stages):
                prefix = f"deep.{row}.{depth}."
                for name in ("encoder", "decoder", "trunk"):
                    stack = getattr(stage, name)
                    if stack is not None:
                        out |= {f"{prefix}{name}.{k}": v for k, v in stack.state_dict().items()}
                if stage.carried is not None:
                    out[prefix + "carried.vector"], out[prefix + "carried.offset"] = (t.detach() for t in stage.carried)
                if stage.router_key is not None:
                    out[prefix + "router_key"] = stage.router_key.detach()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device=None) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        self.byte_encoder.load_state_dict(part("byte_encoder."), device)
        self.byte_decoder.load_state_dict(part("byte_decoder."), device)
        rows = sum(1 for key in tensors if key.startswith("levels."))
        self.levels = [TokenLevels(self.model.splitter) for _ in range(rows)]
        self.deep = [[self._stage(depth) for depth in range(1, self.model.n_stages)] for _ in range(rows)]
        for row, (levels, stages) in enumerate(zip(self.levels, self.deep)):
            levels.feed(tensors[f"levels.{row}"].tolist())
            for depth, stage in enumerate(stages):
                prefix = f"deep.{row}.{depth}."
                for name in ("encoder", "decoder", "trunk"):
                    stack = getattr(stage, name)
                    if stack is not None:
                        stack.load_state_dict(part(f"{prefix}{name}."), device)
                if prefix + "carried.vector" in tensors:
                    stage.carried = (tensors[prefix + "carried.vector"].to(device), tensors[prefix + "carried.offset"])
                if prefix + "router_key" in tensors:
                    stage.router_key = tensors[prefix + "router_key"].to(device)
