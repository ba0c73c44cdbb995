"""Packing documents into one token stream, and cutting it into shuffled training windows.

The loader's whole state is (epoch, position), and each epoch's order comes from
``Generator(seed + epoch)``, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strata.data.errors import DataError


def pack(documents, tokenizer) -> np.ndarray:
    """One int32 stream: BOS, ids of document 1, BOS, ids of document 2, ...

    BOS before every document marks where unrelated text starts, so the model learns not to carry
    context across the seam (and sampling can start from BOS).
    """
    bos = np.array([tokenizer.bos_id], dtype=np.int32)
    parts = [part for document in documents for part in (bos, tokenizer.encode(document.text))]
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, np.int32)


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T] segment ids of packed rows (``pack``'s BOS before every document): each BOS starts a
    new id, so a window that begins mid-document gives its first part id 0."""
    return torch.cumsum(tokens == bos_id, dim=1)


@dataclass
class Batch:
    """Windows of ``seq_len + 1`` ids and, for models that pool by split levels (AU-Net), the
    level of each id. Inputs are ``[:, :-1]``, targets ``[:, 1:]``."""

    tokens: torch.Tensor
    levels: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(self.tokens.to(device), None if self.levels is None else self.levels.to(device))

    def inputs(self) -> dict:
        """Keyword arguments of the model's forward."""
        inputs = {"tokens": self.tokens[:, :-1]}
        if self.levels is not None:
            inputs["levels"] = self.levels[:, :-1]
        return inputs

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]


class TokenLoader:
    """Batches of ``batch_size`` windows of ``seq_len + 1`` tokens: inputs ``[:, :-1]``, targets ``[:, 1:]``.

    Windows start at 0, seq_len, 2·seq_len, ... and so share one token with the next window: every
    token after the first is a target exactly once per epoch (except a tail shorter than seq_len
    that fits no whole window). The window order is shuffled afresh each epoch; a batch that runs
    past the end of an epoch continues with the next epoch's order. ``levels``, when given, are
    cut into the same windows (computed once over the whole stream, so a window that starts
    mid-document carries the levels its bytes have in the document).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, levels: np.ndarray | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        if seed < 0:
            raise ValueError(f"seed must be non-negative for numpy's Generator, got {seed}")
        self.tokens = np.asarray(tokens)
        self.levels = None if levels is None else np.asarray(levels)
        if self.levels is not None and self.levels.shape != self.tokens.shape:
            raise ValueError(f"levels {self.levels.shape} must match tokens {self.tokens.shape}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"training data is {len(self.tokens)} tokens, shorter than one window of seq_len + 1 = "
                f"{seq_len + 1}; add text or lower train.seq_len"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def _starts(self) -> np.ndarray:
        """Start offsets of this epoch's windows in shuffled order (computed once per epoch)."""
        if self._order_epoch != self.epoch:
            order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_windows)
            self._order, self._order_epoch = order * self.seq_len, self.epoch
        return self._order

    def next_batch(self, rank: int = 0, world_size: int = 1) -> Batch:
        """The next batch, or with ``world_size`` processes this ``rank``'s equal share of its rows.

        Every process steps through the same global order and takes its own rows, so the state is
        the same on every process and a run resumes as exactly with another number of them.
        """
        if self.batch_size % world_size:
            raise ValueError(f"batch_size ({self.batch_size}) does not split evenly among {world_size} processes")
        starts = []
        while len(starts) < self.batch_size:
            take = min(self.batch_size - len(starts), self.n_windows - self.position)
            starts.extend(self._starts()[self.position : self.position + take])
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        share = self.batch_size // world_size
        index = np.asarray(starts[rank * share : (rank + 1) * share])[:, None] + np.arange(self.seq_len + 1)
        tokens = torch.from_numpy(self.tokens[index].astype(np.int64))
        return Batch(tokens, None if self.levels is None else torch.from_numpy(self.levels[index].astype(np.int64)))

    def state_dict(self) -> dict:
        """Where the loader is, plus what it was built for (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. A state from another stream or window size is refused, since
        its position would silently point at different data."""
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state is for {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    "the training data or settings changed since the checkpoint"
                )
        position = int(state["position"])
        if not 0 <= position < self.n_windows:
            raise DataError(f"data loader state has position {position} outside 0..{self.n_windows - 1}")
        self.epoch, self.position = int(state["epoch"]), position


class StreamLoader:
    """Consecutive windows for truncated backpropagation through time (``train.carry_state``).

    The stream is cut into ``batch_size`` lanes, one a row; each batch is the next window of
    ``seq_len + 1`` tokens of every lane (sharing one token with the lane's previous window, as
    ``TokenLoader``'s windows do), so a carried state flows from a row's window to its next. After
    the last whole window of the lanes they start again from their beginnings (a new epoch), and
    ``starts_lanes`` tells the trainer to start the carried state afresh.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int):
        self.tokens = np.asarray(tokens)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.lane_length = (len(self.tokens) - 1) // batch_size
        self.n_windows = self.lane_length // seq_len
        if self.n_windows < 1:
            raise DataError(f"training data is {len(self.tokens)} tokens: {batch_size} lanes (train.batch_size) of "
                            f"{self.lane_length} tokens hold no window of seq_len + 1 = {seq_len + 1}; add text or "
                            "lower train.seq_len or train.batch_size")
        self.epoch, self.position = 0, 0

    @property
    def starts_lanes(self) -> bool:
        """Whether the next batch is every lane's first window."""
        return self.position == 0

    def next_batch(self, rank: int = 0, world_size: int = 1) -> Batch:
        share = self.batch_size // world_size
        lanes = np.arange(rank * share, (rank + 1) * share)
        starts = lanes * self.lane_length + self.position * self.seq_len
        index = starts[:, None] + np.arange(self.seq_len + 1)
        self.position += 1
        if self.position == self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        return Batch(torch.from_numpy(self.tokens[index].astype(np.int64)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seq_len": self.seq_len, "n_windows": self.n_windows,
                "lanes": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, have in (("seq_len", self.seq_len), ("n_windows", self.n_windows), ("lanes", self.batch_size)):
            if state.get(key) != have:
                raise DataError(f"data loader state is for {key}={state.get(key)} but this run has {key}={have}; "
                                "the training data or settings changed since the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
