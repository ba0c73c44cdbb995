"""Where the tokens of each sequence in a decoding batch are: left padding, trailing padding (holes),
per-sequence positions, and the masks every attention layer of a stack shares (``strata.inference.cache``)."""

from __future__ import annotations

import copy

import torch


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
