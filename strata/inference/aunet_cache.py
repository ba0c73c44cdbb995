"""AU-Net decoding state: the byte stage's caches for the batch, and per row its deeper stages'.

``AUNet.forward(tokens, cache=...)`` walks the stages (``AUNet.descend``, the walk of the full
forward); this module only keeps what the walk needs between calls. The byte stage is one
left-padded batch (``StackCache``). Deeper stages advance row by row, since rows reach different
depths on the same step: a row whose new byte is no split runs no deeper stage at all, and the
trunk runs once per deepest-level split. Per row the cache keeps the split rule's incremental
state (``TokenLevels``), so each new byte's level is known the moment the byte is, and per deeper
stage a ``StageCache``: its block caches and the segment it left open.

The steps given may be many (prefill, chunked or not) or one (decoding); both go through the same
code, and the tests hold the result equal to the full forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from strata.data.levels import TokenLevels
from strata.inference.cache import StackCache
from strata.models.aunet import AUNet


@dataclass
class StageCache:
    """One row's stage below the byte stage: its block caches (``encoder`` and ``decoder``, or
    ``trunk`` for the deepest stage) and ``carried``, the segment its latest output opened: that
    output [1, 1, d] and the finer stage's offset [1] in it so far (None before its first split).
    ``router_key``: the learned rule's key of the finer stage's latest position [1, 1, d]."""

    encoder: StackCache | None = None
    decoder: StackCache | None = None
    trunk: StackCache | None = None
    carried: tuple[torch.Tensor, torch.Tensor] | None = None
    router_key: torch.Tensor | None = None

    @classmethod
    def of(cls, model: AUNet, depth: int) -> StageCache:
        if depth == model.n_stages - 1:
            return cls(trunk=StackCache(model.trunk, 1, 1))
        return cls(encoder=StackCache(model.encoders[depth], 1, 1), decoder=StackCache(model.decoders[depth], 1, 1))

    @property
    def stacks(self) -> list[StackCache]:
        return [stack for stack in (self.encoder, self.decoder, self.trunk) if stack is not None]

    def copied(self) -> StageCache:
        """A copy that goes on on its own; its KV caches hold only the steps stored so far (they
        grow when needed), so copying a stage costs what it holds."""
        only_row = torch.zeros(1, dtype=torch.long, device=self.stacks[0].sequence.device)
        encoder, decoder, trunk = (stack and stack.fork(only_row, room=0) for stack in (self.encoder, self.decoder, self.trunk))
        return StageCache(encoder, decoder, trunk, self.carried and tuple(tensor.clone() for tensor in self.carried),
                          None if self.router_key is None else self.router_key.clone())


class AUNetCache:
    """Everything an AU-Net needs to decode a batch; ``starts`` = left padding of each row."""

    def __init__(self, model: AUNet, batch_size: int, capacity: int, starts=None):
        self.byte_encoder = StackCache(model.encoders[0], batch_size, capacity, starts=starts)
        self.byte_decoder = StackCache(model.decoders[0], batch_size, capacity, starts=starts)
        self.levels = [TokenLevels(model.splitter) for _ in range(batch_size)]
        self.deep = [[StageCache.of(model, depth) for depth in range(1, model.n_stages)] for _ in range(batch_size)]

    @property
    def sequence(self):
        return self.byte_encoder.sequence

    @property
    def length(self) -> int:
        return self.byte_encoder.length

    def feed(self, tokens: torch.Tensor) -> list[tuple[int, int, torch.Tensor, list[StageCache]]]:
        """Take ``tokens`` [B, T], the steps after those the cache holds (call before the byte stage
        runs them): for each row with real steps among them, (row, the step its real steps begin at,
        their split levels [1, n] (on the CPU), the row's deeper stages)."""
        steps = tokens.shape[1]
        padding = (self.byte_encoder.sequence.starts - self.byte_encoder.length).clamp(0, steps).tolist()
        rows = []
        for row, begin in enumerate(padding):
            if begin < steps:
                levels = self.levels[row].feed(tokens[row, begin:].tolist())
                rows.append((row, begin, torch.from_numpy(levels[None]), self.deep[row]))
        return rows

    holds_trailing_padding = False  # see AUNet.forward

    def select(self, rows: torch.Tensor) -> None:
        """Keep these rows (a row given twice is forked: the copies go on independently)."""
        self.byte_encoder.select(rows)
        self.byte_decoder.select(rows)
        self._take_rows(rows, copy_all=False)

    def fork(self, rows: torch.Tensor, room: int) -> AUNetCache:
        """A new cache of these rows with room for ``room`` more steps; this cache stays as it is."""
        fork = copy.copy(self)
        fork.byte_encoder, fork.byte_decoder = self.byte_encoder.fork(rows, room), self.byte_decoder.fork(rows, room)
        fork._take_rows(rows, copy_all=True)
        return fork

    @classmethod
    def join(cls, caches: list[AUNetCache], room: int = 0) -> AUNetCache:
        """One batch of every row of these caches (``StackCache.join`` for the byte stage; the
        deeper stages are per row already)."""
        joined = copy.copy(caches[0])
        joined.byte_encoder = StackCache.join([cache.byte_encoder for cache in caches], room)
        joined.byte_decoder = StackCache.join([cache.byte_decoder for cache in caches], room)
        joined.levels = [levels for cache in caches for levels in cache.levels]
        joined.deep = [deep for cache in caches for deep in cache.deep]
        return joined

    def snapshot(self, since: int) -> AUNetCache:
        """A copy of this one-sequence cache for a prefix cache (``StackCache.snapshot``). Whole,
        not since ``since``: the deeper stages grow at their own pace, and they are short."""
        return self.fork(torch.tensor([0], device=self.sequence.device), room=0)

    def load(self, chain: list[AUNetCache]) -> None:
        """Take the state of the prefix whose last snapshot ends ``chain``; the snapshot stays intact."""
        source = chain[-1].fork(torch.tensor([0], device=chain[-1].sequence.device), room=0)
        self.byte_encoder, self.byte_decoder = source.byte_encoder, source.byte_decoder
        self.levels, self.deep = source.levels, source.deep

    def _take_rows(self, rows: torch.Tensor, copy_all: bool) -> None:
        """The per-row split state and deep stages of these rows; a row's objects are copied when
        it is given twice, or always (``copy_all``) when another cache keeps the originals."""
        taken: set[int] = set()
        levels, deep = [], []
        for row in rows.tolist():
            if copy_all or row in taken:
                levels.append(copy.deepcopy(self.levels[row]))
                deep.append([stage.copied() for stage in self.deep[row]])
            else:
                levels.append(self.levels[row])
                deep.append(self.deep[row])
            taken.add(row)
        self.levels, self.deep = levels, deep

    @property
    def nbytes(self) -> int:
        stacks = [self.byte_encoder, self.byte_decoder]
        stacks += [stack for row in self.deep for stage in row for stack in stage.stacks]
        return sum(stack.nbytes for stack in stacks)
