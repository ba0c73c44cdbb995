"""Inference caches: what each mixer keeps between decoding steps, and one object per stack of blocks.

    attention              KVCache        keys and values of every token, preallocated, grown in chunks
    sliding-window attn.   WindowCache    the sink tokens plus a ring buffer of the last ``window``
    Mamba-2, Gated DeltaNet RecurrentCache the last ``conv_kernel`` conv inputs and the recurrent state
    intra-layer hybrid     HybridCache    one cache per branch (KVCache and RecurrentCache, or two of a kind)

A batch of prompts of different lengths is left-padded to a common length. ``SequenceState``, shared
by every layer of a stack, knows where each sequence starts; from it the attention caches mask the
padding (keys are never attended to, padded queries see everything so that their rows stay finite)
and the recurrent mixers zero padded conv inputs and their updates (Mamba-2's step size, Gated
DeltaNet's β and decay), so padding never reaches a state.
Positions are per sequence (0 at its first real token), so RoPE and the sink tokens of sliding-
window attention see a padded sequence exactly as they would see it alone.

A forward may also end rows early (``lengths``: the steps after are *trailing padding*) and the
rows then go on from their last real step. The stored pads become holes that attention masks for
good; the recurrent mixers pass their state through them unchanged and keep the conv inputs of
the last real steps. So rows forked from one prefix (``StackCache.fork``) can run
continuations of different lengths in one batch and each go on (the prefix-tree scorer of
multiple choice does). A ring buffer cannot skip a hole, so sliding-window attention refuses
trailing padding (``holds_trailing_padding``).

Mixers use these objects through ``update`` (attention) and the ``conv``/``ssm`` tensors (Mamba-2,
Gated DeltaNet);
the model layers never import this module.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from strata.inference.sequence import SequenceState
from strata.nn.attention import Attention
from strata.nn.gated_deltanet import DeltaRuleMixer
from strata.nn.hybrid import IntraLayerHybrid
from strata.nn.mamba2 import Mamba2

# A KV cache that has to grow (more tokens than it was allocated for) grows to the next multiple
# of this many tokens, so a long generation reallocates rarely.
GROWTH_TOKENS = 1024


def _ring_positions(state: SequenceState, window: int) -> torch.Tensor:
    """Per-sequence position [B|1, window] of the step each ring slot holds (negative when none:
    padding, or a slot not yet written)."""
    slots = torch.arange(window, device=state.device)
    last = state.length - 1
    held = last - torch.remainder(last - slots, window)  # the newest stored step ≡ slot (mod window)
    held = torch.where(held >= 0, held, torch.full_like(held, -(1 << 40)))
    return held[None] - state.shift[:, None] if state.padded else held[None]


class _FixedSize:
    """A cache whose size does not grow with the context (a sliding window, a recurrent state): a
    prefix snapshot keeps it whole, all a later step needs of every earlier one."""

    def piece(self, since: int) -> tuple[torch.Tensor, ...]:
        """Copies of ``tensors()`` (``StackCache.snapshot``)."""
        return tuple(tensor.clone() for tensor in self.tensors())

    def load(self, pieces: list[tuple[torch.Tensor, ...]]) -> None:
        """Take the tensors of the last piece (``StackCache.load``)."""
        for tensor, saved in zip(self.tensors(), pieces[-1], strict=True):
            tensor.copy_(saved)


class KVCache:
    """Keys [B, kv, capacity, d] and values [B, kv, capacity, dv] of every step so far."""

    def __init__(self, attention: Attention, state: SequenceState, capacity: int, dtype: torch.dtype):
        self.sequence = state
        batch, device = state.batch_size, state.device
        self.keys = torch.zeros(batch, attention.n_kv_heads, capacity, attention.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, attention.n_kv_heads, capacity, attention.v_head_dim, dtype=dtype, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """Store the new steps' keys and values; return (keys, values, mask) to attend over."""
        start, end = self.sequence.length, self.sequence.length + keys.shape[2]
        if end > self.keys.shape[2]:
            self._grow(math.ceil(end / GROWTH_TOKENS) * GROWTH_TOKENS)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end], self.sequence.full_mask()

    def _grow(self, capacity: int) -> None:
        def grown(tensor):
            bigger = tensor.new_zeros(*tensor.shape[:2], capacity, tensor.shape[3])
            bigger[:, :, : tensor.shape[2]] = tensor
            return bigger

        self.keys, self.values = grown(self.keys), grown(self.values)

    def forked(self, rows: torch.Tensor, sequence: SequenceState, room: int) -> KVCache:
        """A copy of these rows for ``sequence``, with room for ``room`` more steps: only the
        stored steps are copied, so forking a long-allocated cache costs what it holds."""
        fork = copy.copy(self)
        fork.sequence = sequence
        stored = self.sequence.length

        def taken(tensor):
            # Steps past the stored ones are written before they are read (``update`` stores them).
            rows_taken = tensor.new_empty(len(rows), tensor.shape[1], stored + room, tensor.shape[3])
            rows_taken[:, :, :stored] = tensor[rows, :, :stored]
            return rows_taken

        fork.keys, fork.values = taken(self.keys), taken(self.values)
        return fork

    @classmethod
    def joined(cls, parts: list[KVCache], sequence: SequenceState, room: int) -> KVCache:
        """The rows of ``parts`` as one batch of ``sequence`` (``StackCache.join``): each part's
        stored steps end at the joined length, and steps before it are dropped or left as padding."""
        length = sequence.length
        first = parts[0]
        joined = copy.copy(first)
        joined.sequence = sequence
        shape = (sequence.batch_size, first.keys.shape[1], length + room)
        joined.keys = first.keys.new_zeros(*shape, first.keys.shape[3])
        joined.values = first.values.new_zeros(*shape, first.values.shape[3])
        row = 0
        for part in parts:
            rows, stored = slice(row, row + part.keys.shape[0]), part.sequence.length
            kept = min(stored, length)
            joined.keys[rows, :, length - kept : length] = part.keys[:, :, stored - kept : stored]
            joined.values[rows, :, length - kept : length] = part.values[:, :, stored - kept : stored]
            row = rows.stop
        return joined

    def piece(self, since: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the keys and values stored from step ``since`` on (``StackCache.snapshot``)."""
        end = self.sequence.length
        return self.keys[:, :, since:end].clone(), self.values[:, :, since:end].clone()

    def load(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold the steps of these consecutive pieces, from step 0 (``StackCache.load``)."""
        keys, values = (torch.cat(tensors, dim=2) for tensors in zip(*pieces, strict=True))
        if keys.shape[2] > self.keys.shape[2]:
            self._grow(math.ceil(keys.shape[2] / GROWTH_TOKENS) * GROWTH_TOKENS)
        self.keys[:, :, : keys.shape[2]] = keys
        self.values[:, :, : values.shape[2]] = values

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


class WindowCache(_FixedSize):
    """Sliding-window attention: the first ``sinks`` tokens of each sequence, and a ring buffer of
    the last ``window`` steps (slot = step mod window). Memory stops growing at window + sinks."""

    def __init__(self, attention: Attention, state: SequenceState, dtype: torch.dtype):
        self.sequence = state
        self.window, self.sinks = attention.window, attention.sinks
        batch, device, kv = state.batch_size, state.device, attention.n_kv_heads
        slots = self.sinks + self.window
        self.keys = torch.zeros(batch, kv, slots, attention.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, kv, slots, attention.v_head_dim, dtype=dtype, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """Attend over [sinks, ring, new steps]; then store the new steps."""
        mask = self.sequence.memo(("window", self.window, self.sinks), self._mask)
        all_keys = torch.cat([self.keys, keys], dim=2)
        all_values = torch.cat([self.values, values], dim=2)
        self._store(keys, values)
        return all_keys, all_values, mask

    def _mask(self) -> torch.Tensor:
        state, window, sinks = self.sequence, self.window, self.sinks
        query = state.positions[:, :, None]  # [B|1, T, 1]
        # Sink slot j holds position j once the sequence has reached it; it is seen from queries
        # the window no longer covers it for (inside the window the ring holds it).
        sink_positions = torch.arange(sinks, device=state.device)
        sink = (sink_positions < state.real_lengths()[:, None])[:, None, :] & (query - sink_positions >= window)
        ring_positions = _ring_positions(state, window)[:, None, :]  # [B|1, 1, W]
        ring = (ring_positions >= 0) & (query - ring_positions < window)
        new_positions = state.positions[:, None, :]  # [B|1, 1, T]
        causal = torch.ones(state.steps, state.steps, dtype=torch.bool, device=state.device).tril()
        new = causal & (new_positions >= 0) & ((query - new_positions < window) | (new_positions < sinks))
        parts = [part.expand(state.batch_size, state.steps, -1) for part in (sink, ring, new)]
        mask = torch.cat(parts, dim=-1)[:, None]  # [B, 1, T, sinks + W + T]
        return mask | state.pad_queries()

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        state, steps = self.sequence, keys.shape[2]
        if state.length - state.max_start < self.sinks:  # some sequence is still within its sinks
            positions = state.positions.expand(state.batch_size, -1)
            rows, steps_index = torch.nonzero((positions >= 0) & (positions < self.sinks), as_tuple=True)
            slots = positions[rows, steps_index]
            self.keys[rows, :, slots] = keys[rows, :, steps_index]
            self.values[rows, :, slots] = values[rows, :, steps_index]
        kept = min(steps, self.window)
        first = state.length + steps - kept
        slots = self.sinks + torch.remainder(torch.arange(first, first + kept, device=state.device), self.window)
        self.keys.index_copy_(2, slots, keys[:, :, steps - kept :])
        self.values.index_copy_(2, slots, values[:, :, steps - kept :])

    def forked(self, rows: torch.Tensor, sequence: SequenceState, room: int) -> WindowCache:
        fork = copy.copy(self)
        fork.sequence = sequence
        fork.keys, fork.values = self.keys[rows], self.values[rows]
        return fork

    @classmethod
    def joined(cls, parts: list[WindowCache], sequence: SequenceState, room: int) -> WindowCache:
        """The rows of ``parts`` as one batch of ``sequence``: a step's ring slot follows its index,
        which moves by the difference of the lengths, so each part's ring turns by as much."""
        joined = copy.copy(parts[0])
        joined.sequence = sequence
        sinks = joined.sinks

        def turned(part, tensor):
            moved = (sequence.length - part.sequence.length) % part.window
            return torch.cat([tensor[:, :, :sinks], tensor[:, :, sinks:].roll(moved, dims=2)], dim=2)

        joined.keys = torch.cat([turned(part, part.keys) for part in parts])
        joined.values = torch.cat([turned(part, part.values) for part in parts])
        return joined

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


class RecurrentCache(_FixedSize):
    """A recurrent mixer's (Mamba-2's, Gated DeltaNet's) last ``conv_kernel`` conv inputs
    [B, K, conv_dim] and its state [B, *mixer.state_shape]; the same size whatever the context."""

    def __init__(self, mixer: Mamba2 | DeltaRuleMixer, state: SequenceState, dtype: torch.dtype):
        self.sequence = state
        batch, device, kernel = state.batch_size, state.device, mixer.conv1d.kernel_size[0]
        self.conv = torch.zeros(batch, kernel, mixer.conv_dim, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, *mixer.state_shape, dtype=dtype, device=device)
        self._step_weights: dict | None = None

    def step_weights(self, mixer: Mamba2 | DeltaRuleMixer) -> dict[str, torch.Tensor]:
        """The mixer's derived step parameters, computed on first use (see ``Mamba2.step_weights``)."""
        if self._step_weights is None:
            self._step_weights = mixer.step_weights()
        return self._step_weights

    def forked(self, rows: torch.Tensor, sequence: SequenceState, room: int) -> RecurrentCache:
        fork = copy.copy(self)  # the step weights are shared: they do not change while decoding
        fork.sequence = sequence
        fork.conv, fork.ssm = self.conv[rows], self.ssm[rows]
        return fork

    @classmethod
    def joined(cls, parts: list[RecurrentCache], sequence: SequenceState, room: int) -> RecurrentCache:
        """The rows of ``parts`` as one batch: a state does not depend on where its steps are stored."""
        joined = copy.copy(parts[0])
        joined.sequence = sequence
        joined.conv = torch.cat([part.conv for part in parts])
        joined.ssm = torch.cat([part.ssm for part in parts])
        return joined

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.ssm]


class HybridCache:
    """The caches of an intra-layer hybrid's two branches, in the mixer's order (a, b)."""

    def __init__(self, first, second):
        self.branches = (first, second)

    def forked(self, rows: torch.Tensor, sequence: SequenceState, room: int) -> HybridCache:
        return HybridCache(*(branch.forked(rows, sequence, room) for branch in self.branches))

    @classmethod
    def joined(cls, parts: list[HybridCache], sequence: SequenceState, room: int) -> HybridCache:
        branches = zip(*(part.branches for part in parts), strict=True)
        return HybridCache(*(type(same[0]).joined(list(same), sequence, room) for same in branches))

    def piece(self, since: int) -> tuple:
        return tuple(branch.piece(since) for branch in self.branches)

    def load(self, pieces: list[tuple]) -> None:
        for branch, branch_pieces in zip(self.branches, zip(*pieces, strict=True), strict=True):
            branch.load(list(branch_pieces))

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for branch in self.branches for tensor in branch.tensors()]


def mixer_cache(mixer, state: SequenceState, capacity: int, dtype: torch.dtype):
    """The cache ``mixer`` fills and advances; an attention mixer's RoPE tables are readied for
    ``capacity`` positions."""
    if mixer is None:  # a feed-forward (F) block: nothing to remember
        return None
    if isinstance(mixer, Attention):
        if mixer.rotary is not None:
            mixer.rotary.reserve(capacity, state.device)
        return KVCache(mixer, state, capacity, dtype) if mixer.window is None else WindowCache(mixer, state, dtype)
    if isinstance(mixer, (Mamba2, DeltaRuleMixer)):
        return RecurrentCache(mixer, state, dtype)
    if isinstance(mixer, IntraLayerHybrid):
        return HybridCache(*(mixer_cache(branch, state, capacity, dtype) for branch in mixer.branch_modules()))
    raise TypeError(f"{type(mixer).__name__} has no inference cache")


class StackCache:
    """Everything a stack of blocks (a LanguageModel, or one stage of a hierarchical model) needs
    to decode: one ``SequenceState`` and one cache per block."""

    def __init__(self, blocks, batch_size: int, capacity: int, starts=None, dtype=None, device=None):
        parameter = next(iter(blocks[0].parameters()))
        dtype, device = dtype or parameter.dtype, device or parameter.device
        if starts is None:
            starts = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.sequence = SequenceState(torch.as_tensor(starts, dtype=torch.long, device=device))
        self.layers = [mixer_cache(block.mixer, self.sequence, capacity, dtype) for block in blocks]

    @property
    def length(self) -> int:
        return self.sequence.length

    @property
    def capacity(self) -> int:
        """Steps the KV caches hold before they grow (``length`` when there are none)."""
        kv_caches = [cache for layer in self.layers for cache in (layer.branches if isinstance(layer, HybridCache) else [layer])]
        return max((layer.keys.shape[2] for layer in kv_caches if isinstance(layer, KVCache)), default=self.length)

    @property
    def holds_trailing_padding(self) -> bool:
        """Whether a forward may end rows early (``lengths``) and the rows then go on."""
        return not any(isinstance(layer, WindowCache) for layer in self.layers)

    def fork(self, rows: torch.Tensor, room: int) -> StackCache:
        """A new cache of these rows (a row given twice is forked: the copies go on independently)
        with room for ``room`` more steps before it grows; this cache stays as it is."""
        fork = copy.copy(self)
        fork.sequence = self.sequence.forked(rows)
        fork.layers = [layer and layer.forked(rows, fork.sequence, room) for layer in self.layers]
        return fork

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these sequences (rows of the batch), so finished ones cost nothing more."""
        fork = self.fork(rows, room=self.capacity - self.length)
        self.sequence, self.layers = fork.sequence, fork.layers

    @classmethod
    def join(cls, caches: list[StackCache], room: int = 0) -> StackCache:
        """One batch of every row of these caches (of one stack of blocks), for a batch that
        sequences join while it decodes: each row's stored steps are right-aligned to the longest
        row's, steps that were padding in every row are dropped, and the KV caches have room for
        ``room`` more steps. The caches must hold no trailing padding (no forward with ``lengths``)."""
        if any(cache.sequence.real is not None for cache in caches):
            raise ValueError("cannot join caches that hold trailing padding (a forward with lengths=)")
        real = torch.cat([cache.sequence.real_lengths() for cache in caches])
        joined = copy.copy(caches[0])
        joined.sequence = SequenceState(int(real.max()) - real)
        joined.sequence.length = int(real.max())
        layers = zip(*(cache.layers for cache in caches), strict=True)
        joined.layers = [same[0] and type(same[0]).joined(list(same), joined.sequence, room) for same in layers]
        return joined

    def snapshot(self, since: int) -> StackSnapshot:
        """What a prefix cache keeps of this one-sequence cache at its current length: per layer the
        KV entries stored from step ``since`` on (the earlier ones are in earlier snapshots), and
        whole the states that do not grow (recurrent states, sliding windows)."""
        if self.sequence.batch_size != 1 or self.sequence.padded or self.sequence.real is not None:
            raise ValueError("a snapshot is of a cache of one unpadded sequence")
        return StackSnapshot(self.length, [layer and layer.piece(since) for layer in self.layers])

    def load(self, chain: list[StackSnapshot]) -> None:
        """Take the state of a prefix from its snapshots in order (each taken since the one
        before): this cache, fresh and of one sequence, then holds the prefix's steps."""
        for index, layer in enumerate(self.layers):
            if layer is not None:
                layer.load([snapshot.pieces[index] for snapshot in chain])
        self.sequence.length = chain[-1].length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None for t in layer.tensors())


@dataclass
class StackSnapshot:
    """A one-sequence ``StackCache`` at ``length`` steps, as ``StackCache.snapshot`` keeps it."""

    length: int
    pieces: list

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in _tensors(self.pieces))


def _tensors(pieces):
    for piece in pieces:
        if isinstance(piece, torch.Tensor):
            yield piece
        elif piece is not None:
            yield from _tensors(piece)
