"""The layout language: one symbol per block, and the papers' placements from a ratio.

A stack is a string such as ``MMMAMMMAMMMMM``: ``A`` attention, ``W`` sliding-window attention,
``M`` Mamba-2, ``G`` Gated DeltaNet, ``K`` Kimi Delta Attention, ``H`` intra-layer hybrid, ``F`` a
feed-forward block of its own (Nemotron-H's design, where every block holds one sublayer: a layout
with ``F`` blocks gives the others none).
This module is pure string logic (no torch) so that config validation, the cost model and the
model builder all read layouts the same way.
"""

from __future__ import annotations

import math

BLOCK_SYMBOLS = {
    "A": "attention",
    "W": "sliding-window attention",
    "M": "Mamba-2",
    "G": "Gated DeltaNet",
    "K": "Kimi Delta Attention",
    "H": "intra-layer hybrid (attention + Mamba-2 or Gated DeltaNet heads)",
    "F": "feed-forward only (then no other block has a feed-forward half)",
}

PLACEMENTS = ("front", "middle", "end", "scatter", "cluster", "sandwich")

# The paper's own index sets ("Hybrid Architectures for Language Models", Bae et al., 2025: its
# inter- and intra-layer hybrids and their placement ablations, Tables 11, 17 and 21): 1-indexed positions of the special blocks, by (layers, special blocks, placement). They
# follow no single rule (inter 1:5 "end" is {4, 11}, not the last block), so they are written out;
# ``placement_positions`` takes them before any rule.
PAPER_PLACEMENTS: dict[tuple[int, int, str], tuple[int, ...]] = {
    # inter-layer, 13 blocks: 1:3 and 1:5
    (13, 3, "front"): (1, 7, 11),
    (13, 3, "middle"): (3, 7, 11),
    (13, 3, "end"): (3, 7, 13),
    (13, 2, "front"): (1, 8),
    (13, 2, "middle"): (4, 8),
    (13, 2, "end"): (4, 11),
    # inter-layer 1:1 is 7 attention + 7 Mamba-2 blocks
    (14, 7, "front"): (1, 3, 5, 7, 9, 11, 13),
    (14, 7, "end"): (2, 4, 6, 8, 10, 12, 14),
    # intra-layer, 13 blocks: 1:1, 1:3 and 1:5
    (13, 7, "cluster"): (5, 6, 7, 8, 9, 10, 11),
    (13, 7, "scatter"): (2, 4, 6, 8, 10, 12, 13),
    (13, 7, "sandwich"): (1, 2, 6, 7, 8, 12, 13),
    (13, 3, "cluster"): (9, 10, 11),
    (13, 3, "scatter"): (4, 7, 11),
    (13, 3, "sandwich"): (1, 7, 13),
    (13, 2, "cluster"): (9, 10),
    (13, 2, "scatter"): (5, 9),
    (13, 2, "sandwich"): (1, 13),
    # sliding-window baseline: global attention blocks among 16
    (16, 4, "middle"): (4, 7, 10, 13),
    (16, 3, "middle"): (5, 9, 13),
    (16, 3, "end"): (5, 9, 16),
}


def check_layout(layout: str) -> str:
    """Return ``layout`` if every symbol is known, else raise ValueError naming the first bad one."""
    if not layout:
        raise ValueError("layout is empty")
    for index, symbol in enumerate(layout):
        if symbol not in BLOCK_SYMBOLS:
            known = ", ".join(f"{s} ({name})" for s, name in BLOCK_SYMBOLS.items())
            raise ValueError(f"unknown layout symbol {symbol!r} at block {index + 1}; known: {known}")
    return layout


def parse_ratio(ratio: str) -> tuple[int, int]:
    """``"1:5"`` -> (1, 5): special blocks to base blocks."""
    parts = ratio.split(":")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise ValueError(f"ratio must look like '1:5' (special:base), got {ratio!r}")
    special, base = int(parts[0]), int(parts[1])
    if special + base == 0:
        raise ValueError("ratio 0:0 has no blocks")
    return special, base


def special_count(layers: int, ratio: str) -> int:
    """How many of ``layers`` blocks are special at ``ratio``, rounding halves up (13 at 1:1 -> 7)."""
    special, base = parse_ratio(ratio)
    if special == 0:
        return 0
    return max(1, min(layers, math.floor(layers * special / (special + base) + 0.5)))


def placement_positions(layers: int, count: int, placement: str) -> list[int]:
    """1-indexed positions of ``count`` special blocks among ``layers`` for a named placement.

    Where the paper printed the set (``PAPER_PLACEMENTS``: 13 blocks at 1:3 and 1:5, 13 or 14 at
    1:1, the 16-block sliding-window baseline) it is the answer. Elsewhere a rule:

    - ``middle``: evenly spread, rounding down (13, 1 -> 6);
    - ``scatter``: evenly spread, rounding up (13, 1 -> 7);
    - ``front``: the first block, the rest as in ``middle``;
    - ``end``: the last block, the rest as in ``middle``;
    - ``cluster``: consecutive blocks from two thirds of the way up;
    - ``sandwich``: first and last, the rest spread between.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}")
    if count > layers:
        raise ValueError(f"cannot place {count} special blocks among {layers} layers")
    if count == layers:
        return list(range(1, layers + 1))
    if count == 0:
        return []
    if (layers, count, placement) in PAPER_PLACEMENTS:
        return list(PAPER_PLACEMENTS[layers, count, placement])
    spread_down = [math.floor(layers * j / (count + 1)) for j in range(1, count + 1)]
    spread_up = [math.ceil(layers * j / (count + 1)) for j in range(1, count + 1)]
    if placement == "middle":
        return spread_down
    if placement == "scatter":
        return spread_up
    if placement == "front":
        return [1] + spread_down[1:]
    if placement == "end":
        return spread_down[:-1] + [layers]
    if placement == "cluster":
        start = min(math.ceil(2 * layers / 3), layers - count + 1)
        return list(range(start, start + count))
    if count == 1:  # sandwich
        return [1]
    inner = count - 2
    return [1] + [1 + math.floor((layers - 1) * j / (inner + 1)) for j in range(1, inner + 1)] + [layers]


def make_layout(
    layers: int,
    ratio: str = "1:5",
    placement: str | list[int] = "middle",
    special: str = "A",
    base: str = "M",
) -> str:
    """Build a layout string: ``make_layout(13, "1:5", "middle")`` -> ``"MMMAMMMAMMMMM"``.

    ``placement`` is a named placement or an explicit list of 1-indexed positions (whose length
    then sets the number of special blocks and ``ratio`` is ignored).
    """
    for role, symbol in (("special", special), ("base", base)):
        if len(symbol) != 1:
            raise ValueError(f"{role} must be one layout symbol, got {symbol!r}")
        check_layout(symbol)
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    if isinstance(placement, str):
        positions = placement_positions(layers, special_count(layers, ratio), placement)
    else:
        positions = list(placement)
        bad = [p for p in positions if not 1 <= p <= layers]
        if bad:
            raise ValueError(f"positions {bad} are outside 1..{layers}")
        if len(set(positions)) != len(positions):
            raise ValueError(f"positions {positions} repeat a layer")
    chosen = set(positions)
    return "".join(special if i in chosen else base for i in range(1, layers + 1))
