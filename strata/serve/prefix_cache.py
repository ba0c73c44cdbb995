"""Prefix caching for hybrid models: what a prompt's prefill leaves behind, for the next prompt
that starts the same way.

A prompt is prefilled in blocks of ``block`` tokens, and at the end of each whole block the
server keeps a snapshot of its cache (``StackCache.snapshot``): the KV entries of the block's
tokens for attention, and whole the states that do not grow with the context (Mamba-2's and
Gated DeltaNet's conv inputs and recurrent state, sliding windows). Attention alone could reuse
any shared prefix; a recurrent state exists only where it was saved, so the reusable prefixes are
the whole blocks. A later prompt restores the longest chain of blocks it shares (at least one of
its tokens is left to prefill: the logits of its last token come from that) and prefills the
rest in the same blocks, so a hit gives the cold run's logits bit for bit.

Blocks form a tree (a block's key is every token up to its end). Memory is bounded by
``capacity`` bytes: the least recently used block goes first, with the blocks below it, which
no lookup could reach any more. A hit refreshes its whole chain, the first block last, so blocks
go from the leaves up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class _Block:
    snapshot: object  # a StackSnapshot, or a one-sequence AUNetCache
    nbytes: int
    children: set = field(default_factory=set)


class PrefixCache:
    def __init__(self, block: int, capacity: int):
        if block < 1:
            raise ValueError(f"the snapshot block must be at least one token, got {block}")
        self.block, self.capacity = block, capacity
        self._blocks: OrderedDict[tuple[int, ...], _Block] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, ids: list[int]) -> list:
        """The snapshots of the longest chain of stored blocks that starts ``ids`` and leaves at
        least its last token out, first block first (empty on a miss); the chain becomes the most
        recently used."""
        chain = []
        for end in range(self.block, len(ids), self.block):
            key = tuple(ids[:end])
            if key not in self._blocks:
                break
            chain.append(key)
        for key in reversed(chain):
            self._blocks.move_to_end(key)
        return [self._blocks[key].snapshot for key in chain]

    def wants(self, ids: list[int]) -> bool:
        """Whether a snapshot after ``ids`` (a whole number of blocks) would be stored: it is not
        yet, and the block before it is (a block no lookup can reach is not worth its memory)."""
        if len(ids) % self.block or tuple(ids) in self._blocks or self.capacity <= 0:
            return False
        return len(ids) == self.block or tuple(ids[: -self.block]) in self._blocks

    def insert(self, ids: list[int], snapshot, nbytes: int) -> None:
        """Keep ``snapshot``, taken after ``ids``, then evict down to the capacity."""
        if not self.wants(ids) or nbytes > self.capacity:
            return
        key = tuple(ids)
        self._blocks[key] = _Block(snapshot, nbytes)
        if len(ids) > self.block:
            self._blocks[key[: -self.block]].children.add(key)
        for end in range(len(ids) - self.block, 0, -self.block):  # ancestors stay younger than the block
            self._blocks.move_to_end(key[:end])
        self.nbytes += nbytes
        while self.nbytes > self.capacity:
            self._evict(next(iter(self._blocks)))

    def _evict(self, key: tuple[int, ...]) -> None:
        block = self._blocks.pop(key)
        self.nbytes -= block.nbytes
        parent = self._blocks.get(key[: -self.block])
        if parent is not None:
            parent.children.discard(key)
        for child in list(block.children):
            if child in self._blocks:
                self._evict(child)
