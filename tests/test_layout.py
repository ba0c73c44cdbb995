"""The layout language: the paper's placements at 13 layers, ratio counts, errors, and a property."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strata.layout import PLACEMENTS, make_layout, parse_ratio, placement_positions, special_count


def positions(layout: str, symbol: str) -> list[int]:
    """1-indexed positions of ``symbol`` in ``layout``."""
    return [index for index, s in enumerate(layout, start=1) if s == symbol]


# --- the paper's placements (the hybrid paper's inter- and intra-layer hybrids and its placement appendix), 13 layers -----------------------


def test_inter_1_5_middle_is_the_papers_recipe():
    """Brief §4: ≈1:5 with attention at layers 4 and 8 of 13."""
    assert make_layout(13, "1:5", "middle") == "MMMAMMMAMMMMM"
    # middle is the default placement and 1:5 the default ratio
    assert make_layout(13) == "MMMAMMMAMMMMM"


# The paper's index sets, copied from the hybrid paper (its hybrids and the appendix on placement) and the
# paper's Tables 11, 17 and 21: (layers, ratio, placement, special, base, 1-indexed positions).
PAPER_SETS = [
    # inter-layer, 13 blocks
    (13, "1:3", "front", "A", "M", [1, 7, 11]),
    (13, "1:3", "middle", "A", "M", [3, 7, 11]),
    (13, "1:3", "end", "A", "M", [3, 7, 13]),
    (13, "1:5", "front", "A", "M", [1, 8]),
    (13, "1:5", "middle", "A", "M", [4, 8]),
    (13, "1:5", "end", "A", "M", [4, 11]),
    # inter-layer 1:1: 7 attention + 7 Mamba-2 = 14 blocks
    (14, "1:1", "front", "A", "M", [1, 3, 5, 7, 9, 11, 13]),
    (14, "1:1", "end", "A", "M", [2, 4, 6, 8, 10, 12, 14]),
    # intra-layer, 13 blocks
    (13, "1:1", "cluster", "H", "M", [5, 6, 7, 8, 9, 10, 11]),
    (13, "1:1", "scatter", "H", "M", [2, 4, 6, 8, 10, 12, 13]),
    (13, "1:1", "sandwich", "H", "M", [1, 2, 6, 7, 8, 12, 13]),
    (13, "1:3", "cluster", "H", "M", [9, 10, 11]),
    (13, "1:3", "scatter", "H", "M", [4, 7, 11]),
    (13, "1:3", "sandwich", "H", "M", [1, 7, 13]),
    (13, "1:5", "cluster", "H", "M", [9, 10]),
    (13, "1:5", "scatter", "H", "M", [5, 9]),
    (13, "1:5", "sandwich", "H", "M", [1, 13]),
    # sliding-window baseline: global attention blocks among 16
    (16, "1:3", "middle", "A", "W", [4, 7, 10, 13]),
    (16, "1:5", "middle", "A", "W", [5, 9, 13]),
    (16, "1:5", "end", "A", "W", [5, 9, 16]),
]


@pytest.mark.parametrize("layers, ratio, placement, special, base, expected", PAPER_SETS)
def test_named_placements_are_the_papers_sets(layers, ratio, placement, special, base, expected):
    layout = make_layout(layers, ratio, placement, special=special, base=base)
    assert len(layout) == layers
    assert positions(layout, special) == expected
    assert layout.count(base) == layers - len(expected)


def test_intra_final_recipe_layout_string():
    assert make_layout(13, "1:5", "scatter", special="H") == "MMMMHMMMHMMMM"


@pytest.mark.parametrize(
    "layers, count, placement, expected",
    [
        # outside the paper's sets the documented rules apply
        (13, 1, "middle", [6]),
        (13, 1, "scatter", [7]),
        (22, 4, "middle", [4, 8, 13, 17]),
        (22, 4, "front", [1, 8, 13, 17]),
        (22, 4, "end", [4, 8, 13, 22]),
        (22, 4, "scatter", [5, 9, 14, 18]),
        (22, 4, "cluster", [15, 16, 17, 18]),
        (22, 4, "sandwich", [1, 8, 15, 22]),
    ],
)
def test_rules_outside_the_papers_sets(layers, count, placement, expected):
    assert placement_positions(layers, count, placement) == expected


# --- explicit positions -----------------------------------------------------------------------


def test_explicit_positions():
    assert make_layout(13, placement=[4, 8]) == "MMMAMMMAMMMMM"
    assert make_layout(13, placement=[5, 9], special="H") == "MMMMHMMMHMMMM"
    # positions set the count; the ratio is ignored
    assert make_layout(13, "1:1", [1]) == "A" + "M" * 12
    assert make_layout(4, placement=[]) == "MMMM"
    assert make_layout(16, placement=[4, 8, 12], special="A", base="W") == "WWWAWWWAWWWAWWWW"


@pytest.mark.parametrize("layer", range(1, 13))
def test_1_12_sweep_with_explicit_position(layer):
    """Appendix: one attention block swept over layers 1..12 of 13."""
    layout = make_layout(13, placement=[layer])
    assert positions(layout, "A") == [layer]
    assert layout.count("M") == 12


def test_explicit_positions_order_does_not_matter():
    assert make_layout(13, placement=[8, 4]) == make_layout(13, placement=[4, 8])


# --- ratio counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, ratio, count",
    [
        (13, "1:1", 7),  # intra 1:1: 6 M + 7 H
        (14, "1:1", 7),  # inter 1:1: 7 A + 7 M
        (13, "1:3", 3),  # 3 + 10
        (13, "1:5", 2),  # 2 + 11
        (13, "1:12", 1),  # 1 + 12
        (13, "0:1", 0),  # pure Mamba
        (13, "1:0", 13),  # every block special
        (16, "1:5", 3),  # SWA baseline: 3 global + 13 SWA
        (1, "1:12", 1),  # at least one special block when the ratio asks for any
    ],
)
def test_special_count(layers, ratio, count):
    assert special_count(layers, ratio) == count


@pytest.mark.parametrize("ratio, count", [("1:1", 7), ("1:3", 3), ("1:12", 1), ("0:1", 0)])
@pytest.mark.parametrize("placement", ["scatter", "cluster", "sandwich", "middle"])
def test_ratio_counts_in_layouts(ratio, count, placement):
    layout = make_layout(13, ratio, placement)
    assert len(layout) == 13
    assert layout.count("A") == count
    assert layout.count("M") == 13 - count


def test_zero_ratio_gives_no_special_blocks():
    assert make_layout(13, "0:1", "middle") == "M" * 13
    assert make_layout(13, "0:7", "scatter", special="H") == "M" * 13


def test_parse_ratio():
    assert parse_ratio("1:5") == (1, 5)
    assert parse_ratio(" 2 : 3 ") == (2, 3)
    assert parse_ratio("0:1") == (0, 1)


@pytest.mark.parametrize("placement", ["scatter", "cluster", "sandwich"])
def test_all_special_works_for_some_placements(placement):
    assert make_layout(13, "1:0", placement, special="H") == "H" * 13


@pytest.mark.parametrize("placement", ["middle", "front", "end"])
def test_all_special_for_middle_front_end(placement):
    assert make_layout(13, "1:0", placement, special="H") == "H" * 13


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(special="X"), "unknown layout symbol 'X'"),
        (dict(base="m"), "unknown layout symbol 'm'"),
        (dict(ratio="1-5"), "ratio must look like"),
        (dict(ratio="1:5:2"), "ratio must look like"),
        (dict(ratio="a:b"), "ratio must look like"),
        (dict(ratio="-1:5"), "ratio must look like"),
        (dict(ratio=""), "ratio must look like"),
        (dict(ratio="0:0"), "0:0"),
        (dict(placement="random"), "unknown placement 'random'"),
        (dict(placement="Middle"), "unknown placement"),
        (dict(placement=[0, 4]), r"outside 1\.\.13"),
        (dict(placement=[14]), r"outside 1\.\.13"),
        (dict(placement=[-1]), r"outside 1\.\.13"),
        (dict(placement=[4, 4]), "repeat"),
        (dict(placement=[4, 8, 4]), "repeat"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_layout(13, **kwargs)


@pytest.mark.parametrize("layers", [0, -3])
def test_layers_must_be_positive(layers):
    with pytest.raises(ValueError, match="layers must be at least 1"):
        make_layout(layers)


def test_unknown_placement_lists_known_ones():
    with pytest.raises(ValueError) as error:
        make_layout(13, "1:5", "random")
    for name in PLACEMENTS:
        assert name in str(error.value)


def test_too_many_explicit_special_blocks_for_placement_positions():
    with pytest.raises(ValueError, match="cannot place 5 special blocks among 4 layers"):
        placement_positions(4, 5, "middle")


@pytest.mark.parametrize("symbols", [dict(special="AA"), dict(special=""), dict(base="MM")])
def test_special_and_base_must_be_single_symbols(symbols):
    with pytest.raises(ValueError):
        make_layout(6, "1:5", "middle", **symbols)


def test_unknown_placement_rejected_even_with_zero_ratio():
    with pytest.raises(ValueError, match="unknown placement"):
        make_layout(13, "0:1", "random")


# --- properties -------------------------------------------------------------------------------


SPECIAL_BASE = st.sampled_from([("A", "M"), ("H", "M"), ("A", "W"), ("W", "M"), ("M", "A")])


@given(
    layers=st.integers(1, 40),
    a=st.integers(0, 12),
    b=st.integers(0, 12),
    placement=st.sampled_from(PLACEMENTS),
    symbols=SPECIAL_BASE,
)
def test_named_placement_property(layers, a, b, placement, symbols):
    special, base = symbols
    ratio = f"{a}:{b}"
    try:
        layout = make_layout(layers, ratio, placement, special, base)
    except ValueError as error:
        message = str(error)
        assert message and "\n" not in message
        assert any(word in message for word in ("ratio", "placement", "layers")), message
        if a + b == 0:
            assert "0:0" in message
        return
    assert a + b > 0
    count = special_count(layers, ratio)
    assert len(layout) == layers
    assert set(layout) <= {special, base}
    assert layout.count(special) == count
    assert positions(layout, special) == sorted(placement_positions(layers, count, placement))


@given(layers=st.integers(1, 40), a=st.integers(0, 12), b=st.integers(0, 12))
def test_special_count_rounds_the_ratio(layers, a, b):
    if a + b == 0:
        with pytest.raises(ValueError, match="0:0"):
            special_count(layers, f"{a}:{b}")
        return
    count = special_count(layers, f"{a}:{b}")
    exact = layers * a / (a + b)
    assert 0 <= count <= layers
    if a == 0:
        assert count == 0
    else:
        assert count >= 1
        assert count == max(1, min(layers, math.floor(exact + 0.5)))
        if exact >= 0.5:
            assert abs(count - exact) <= 0.5


@given(
    layers=st.integers(1, 40),
    chosen=st.lists(st.integers(-5, 45), max_size=10),
)
def test_explicit_positions_property(layers, chosen):
    try:
        layout = make_layout(layers, placement=chosen)
    except ValueError as error:
        assert ("outside" in str(error)) or ("repeat" in str(error))
        assert any(not 1 <= p <= layers for p in chosen) or len(set(chosen)) != len(chosen)
        return
    assert len(layout) == layers
    assert positions(layout, "A") == sorted(chosen)


@given(ratio=st.text(alphabet="0123456789: -+.x\u00b2\uff11", max_size=8))
def test_arbitrary_ratio_text_raises_only_value_error(ratio):
    try:
        make_layout(13, ratio, "scatter")
    except ValueError:
        pass
