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

import torch

from strata.nn.attention import Attention
from strata.nn.gated_deltanet import GatedDeltaNet
from strata.nn.hybrid import IntraLayerHybrid
from strata.nn.mamba2 import Mamba2

# A KV cache that has to grow (more tokens than it was allocated for) grows to the next multiple
# of this many tokens, so a long generation reallocates rarely.
GROWTH_TOKENS = 1024


class SequenceState:
    """Where the tokens of each sequence in the batch are, shared by every layer of one stack.

    ``length`` counts the time steps already stored (padding included); ``starts[b]`` is how many of
    the first steps of sequence ``b`` are padding, and ``shift[b]`` how many stored steps are padding
    in all (left padding plus the trailing padding of earlier forwards), so a step's position is
    its index minus ``shift``. Once a forward has ended rows early, ``real`` [B, length] marks the
    stored steps that are tokens (None before: then only left padding exists).

    Between ``begin(T)`` and ``commit()`` the layers process steps ``length .. length+T−1``;
    ``positions`` are their per-sequence positions, ``pad`` marks the padded ones (None when there
    are none among them) and ``lengths`` [B] says how many of them each row keeps (None: all).
    """

    def __init__(self, starts: torch.Tensor):
        self.starts = starts
        self.shift = starts
        self.real: torch.Tensor | None = None
        self.length = 0
        self._update_padding()
        self.steps = 0
        self.positions: torch.Tensor | None = None
        self.pad: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self._step_memo: dict = {}

    @property
    def batch_size(self) -> int:
        return self.starts.shape[0]

    @property
    def device(self) -> torch.device:
        return self.starts.device

    def _update_padding(self) -> None:
        # Python ints, so that deciding whether a step needs masking never waits on the device.
        self.padded = any(self.shift.tolist())
        self.max_start = max(self.starts.tolist(), default=0)

    def begin(self, steps: int, lengths: torch.Tensor | None = None) -> None:
        self.steps = steps
        self._step_memo = {}
        steps_range = torch.arange(self.length, self.length + steps, device=self.device)
        if self.padded:
            self.positions = steps_range[None] - self.shift[:, None]
            self.pad = self.positions < 0 if self.length < self.max_start else None
        else:
            self.positions, self.pad = steps_range[None], None
        self.lengths = lengths
        if lengths is not None:
            trailing = torch.arange(steps, device=self.device)[None] >= lengths[:, None]
            self.pad = trailing if self.pad is None else self.pad | trailing

    def commit(self) -> None:
        if self.lengths is not None or self.real is not None:
            if self.real is None:  # the first holes: until now only left padding was not real
                self.real = torch.arange(self.length, device=self.device)[None] >= self.starts[:, None]
            self.real = torch.cat([self.real, self._new_real()], dim=1)
        if self.lengths is not None:
            self.shift = self.shift + (self.steps - self.lengths)
            self._update_padding()
        self.length += self.steps
        self.steps = 0
        self.lengths = None

    def _new_real(self) -> torch.Tensor:
        """[B, T]: which of this forward's steps are tokens."""
        if self.pad is None:
            return torch.ones(self.batch_size, self.steps, dtype=torch.bool, device=self.device)
        return ~self.pad.expand(self.batch_size, -1)

    def forked(self, rows: torch.Tensor) -> SequenceState:
        """A copy holding only these rows (a row given twice is forked)."""
        fork = copy.copy(self)
        fork.starts, fork.shift = self.starts[rows], self.shift[rows]
        fork.real = None if self.real is None else self.real[rows]
        fork._update_padding()
        return fork

    def real_lengths(self) -> torch.Tensor:
        """[B]: how many real (unpadded) steps of each sequence are stored."""
        return self.length - self.shift

    def memo(self, key, build):
        """What every layer of the same kind computes alike within one step (masks, RoPE tables)."""
        if key not in self._step_memo:
            self._step_memo[key] = build()
        return self._step_memo[key]

    def rope(self, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [B|1, T, 1, D] (broadcast over heads) for this step's positions, looked up
        once for all layers alike."""

        def tables():
            if self.padded:
                return tuple(table[:, :, None] for table in rotary.at(self.positions, self.length + self.steps))
            return tuple(table[None, :, None] for table in rotary(self.steps, self.length))

        return self.memo(rotary.key, tables)

    def full_mask(self) -> torch.Tensor | None:
        """Boolean [B|1, 1, T, length+T] for full attention over the stored and the new steps, or
        None when plain attention is exact (a single step with no padding, or causal from empty)."""
        return self.memo("full", self._full_mask)

    def _full_mask(self) -> torch.Tensor | None:
        total = self.length + self.steps
        # (Trailing padding alone needs no mask: causal attention never lets a real step see it.)
        if not self.padded and self.real is None and (self.steps == 1 or self.length == 0):
            return None
        key_steps = torch.arange(total, device=self.device)
        query_steps = torch.arange(self.length, total, device=self.device)
        mask = (key_steps[None, :] <= query_steps[:, None])[None, None]  # [1, 1, T, S]
        if self.real is not None:
            real_key = torch.cat([self.real, self._new_real()], dim=1)  # [B, S]
            mask = mask & real_key[:, None, None, :]
        elif self.padded:
            mask = mask & (key_steps[None, :] >= self.starts[:, None])[:, None, None, :]
        return mask | self.pad_queries()

    def pad_queries(self) -> torch.Tensor | bool:
        """[B, 1, T, 1], True on padded queries (which may then see every key and stay finite)."""
        if self.pad is None:
            return False
        return self.pad[:, None, :, None]


def _ring_positions(state: SequenceState, window: int) -> torch.Tensor:
    """Per-sequence position [B|1, window] of the step each ring slot holds (negative when none:
    padding, or a slot not yet written)."""
    slots = torch.arange(window, device=state.device)
    last = state.length - 1
    held = last - torch.remainder(last - slots, window)  # the newest stored step ≡ slot (mod window)
    held = torch.where(held >= 0, held, torch.full_like(held, -(1 << 40)))
    return held[None] - state.shift[:, None] if state.padded else held[None]


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

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


class WindowCache:
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

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


class RecurrentCache:
    """A recurrent mixer's (Mamba-2's, Gated DeltaNet's) last ``conv_kernel`` conv inputs
    [B, K, conv_dim] and its state [B, *mixer.state_shape]; the same size whatever the context."""

    def __init__(self, mixer: Mamba2 | GatedDeltaNet, state: SequenceState, dtype: torch.dtype):
        self.sequence = state
        batch, device, kernel = state.batch_size, state.device, mixer.conv1d.kernel_size[0]
        self.conv = torch.zeros(batch, kernel, mixer.conv_dim, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, *mixer.state_shape, dtype=dtype, device=device)
        self._step_weights: dict | None = None

    def step_weights(self, mixer: Mamba2 | GatedDeltaNet) -> dict[str, torch.Tensor]:
        """The mixer's derived step parameters, computed on first use (see ``Mamba2.step_weights``)."""
        if self._step_weights is None:
            self._step_weights = mixer.step_weights()
        return self._step_weights

    def forked(self, rows: torch.Tensor, sequence: SequenceState, room: int) -> RecurrentCache:
        fork = copy.copy(self)  # the step weights are shared: they do not change while decoding
        fork.sequence = sequence
        fork.conv, fork.ssm = self.conv[rows], self.ssm[rows]
        return fork

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.ssm]


class HybridCache:
    """The caches of an intra-layer hybrid's two branches, in the mixer's order (a, b)."""

    def __init__(self, first, second):
        self.branches = (first, second)

    def forked(self, rows: torch.Tensor, sequence: SequenceState, room: int) -> HybridCache:
        return HybridCache(*(branch.forked(rows, sequence, room) for branch in self.branches))

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
    if isinstance(mixer, (Mamba2, GatedDeltaNet)):
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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None for t in layer.tensors())
