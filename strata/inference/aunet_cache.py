"""AU-Net decoding: the byte stage runs every step, a deeper stage only on the steps that reach it.

``AUNetCache`` is what ``AUNet.forward(tokens, cache=...)`` hands the work to. Per batch row it
keeps the split rule's incremental state (``TokenLevels``), so each new byte's level is known the
moment the byte is, and per deeper stage: the stage's own block caches (encoder and decoder, or
the trunk), its latest output, and how far past its latest split the finer stage has moved (the
offset its upsampling needs). The byte stage is one left-padded batch (``StackCache``); deeper
stages advance row by row, since rows reach different depths on the same step: a row whose new
byte is no split runs no deeper stage at all, and the trunk runs once per deepest-level split.

The steps given may be many (prefill, chunked or not) or one (decoding); both go through the same
code, and the tests hold the result equal to the full forward.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from strata.data.levels import TokenLevels, splitter_for
from strata.inference.cache import StackCache
from strata.models.aunet import AUNet
from strata.models.lm import run_stack


class _DeepStages:
    """One row's stages 2..S: block caches, latest outputs, offsets inside the current segments."""

    def __init__(self, model: AUNet):
        deepest = model.n_stages - 1
        self.encoders = [StackCache(model.encoders[k], 1, 1) for k in range(1, deepest)]
        self.decoders = [StackCache(model.decoders[k], 1, 1) for k in range(1, deepest)]
        self.trunk = StackCache(model.trunk, 1, 1)
        self.latest: list[torch.Tensor | None] = [None] * model.n_stages  # [1, d_k] per stage k >= 1
        self.offset = [0] * model.n_stages  # offset of the finer stage's latest position, per stage k >= 1

    def advance(self, model: AUNet, depth: int, hidden: torch.Tensor, levels: np.ndarray) -> torch.Tensor:
        """Stage ``depth - 1`` produced ``hidden`` [n, d] at new positions with these ``levels``:
        run stage ``depth`` on the splits among them and return what it sends back up to each of
        the n positions, [n, d]."""
        split = levels >= depth
        coarse = self.latest[depth]
        if split.any():
            x = model.pools[depth - 1](hidden[torch.from_numpy(split).to(hidden.device)])[None]
            if depth == model.n_stages - 1:
                y = run_stack(model.trunk, x, self.trunk)
            else:
                encoded = run_stack(model.encoders[depth], x, self.encoders[depth - 1])
                up = self.advance(model, depth + 1, encoded[0], levels[split])
                y = run_stack(model.decoders[depth], encoded + up[None], self.decoders[depth - 1])
            coarse = y[0] if coarse is None else torch.cat([coarse, y[0]])
        elif coarse is None:
            raise RuntimeError("an AU-Net row must start with a split at every stage")
        # Segment of each position, counted in ``coarse`` (whose first row is the previous segment's
        # vector when there was one), and where that segment starts (the previous one before 0).
        had_previous = self.latest[depth] is not None
        segment = np.cumsum(split) - (0 if had_previous else 1)
        starts = np.flatnonzero(split)
        if had_previous:
            starts = np.concatenate([[-(self.offset[depth] + 1)], starts])
        offset = np.arange(len(levels)) - starts[segment]
        device = hidden.device
        up = model.ups[depth - 1](
            coarse[None], torch.from_numpy(segment)[None].to(device), torch.from_numpy(offset)[None].to(device)
        )
        self.latest[depth] = coarse[-1:]
        self.offset[depth] = int(offset[-1])
        return up[0]


class AUNetCache:
    """Everything an AU-Net needs to decode a batch; ``starts`` = left padding of each row."""

    def __init__(self, model: AUNet, batch_size: int, capacity: int, starts=None):
        splitter = splitter_for(model.config)
        self.byte_encoder = StackCache(model.encoders[0], batch_size, capacity, starts=starts)
        self.byte_decoder = StackCache(model.decoders[0], batch_size, capacity, starts=starts)
        self.levels = [TokenLevels(splitter) for _ in range(batch_size)]
        self.deep = [_DeepStages(model) for _ in range(batch_size)]
        self.started = [False] * batch_size

    @property
    def sequence(self):
        return self.byte_encoder.sequence

    @property
    def length(self) -> int:
        return self.byte_encoder.length

    def forward(self, model: AUNet, tokens: torch.Tensor, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of ``tokens`` [B, T], the steps after those the cache holds (selected as
        ``AUNet.forward`` selects them)."""
        steps = tokens.shape[1]
        first_step = self.byte_encoder.length
        padding = (self.byte_encoder.sequence.starts - first_step).clamp(0, steps).tolist()
        hidden = run_stack(model.encoders[0], model.embed(tokens), self.byte_encoder)
        up = torch.zeros_like(hidden)
        for row, pad in enumerate(padding):
            if pad == steps:
                continue
            levels = self.levels[row].feed(tokens[row, pad:].tolist())
            if not self.started[row]:  # a row's first position opens a segment at every stage
                levels[0] = model.n_stages - 1
                self.started[row] = True
            up[row, pad:] = self.deep[row].advance(model, 1, hidden[row, pad:], levels)
        y = run_stack(model.decoders[0], hidden + up, self.byte_decoder)
        return model.logits(y[logits_at] if logits_at is not None else y[:, -1:] if last_only else y)

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

    def _take_rows(self, rows: torch.Tensor, copy_all: bool) -> None:
        """The per-row split state and deep stages of these rows; a row's objects are copied when
        it is given twice, or always (``copy_all``) when another cache keeps the originals."""
        taken: set[int] = set()
        levels, deep, started = [], [], []
        for row in rows.tolist():
            fork = copy.deepcopy if copy_all or row in taken else (lambda item: item)
            taken.add(row)
            levels.append(fork(self.levels[row]))
            deep.append(fork(self.deep[row]))
            started.append(self.started[row])
        self.levels, self.deep, self.started = levels, deep, started

    @property
    def nbytes(self) -> int:
        stacks = [self.byte_encoder, self.byte_decoder]
        stacks += [stack for row in self.deep for stack in (*row.encoders, *row.decoders, row.trunk)]
        return sum(stack.nbytes for stack in stacks)
