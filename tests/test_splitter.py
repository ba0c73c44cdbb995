"""AU-Net splitters: levels never change when bytes are appended, streams equal batches, the rules by hand."""

import itertools

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.data.splitter import RULES, make_splitter

# Text pieces that reach every branch of the rules: several scripts, digit runs, punctuation and
# symbols (some multi-byte), each kind of whitespace, and newline runs.
PIECES = [
    "the", "Cat", "é", "Жук", "日本語", "١٢٣", "42", "12345", ".", "!?", "«", "…", "🙂", "-",
    " ", "  ", "\t", "\n", "\r\n", "\n\n", "\u3000", "\x85",
]  # fmt: skip
text_bytes = st.lists(st.sampled_from(PIECES), max_size=30).map(lambda pieces: "".join(pieces).encode())
# The same with raw bytes in between: invalid UTF-8, characters cut short or completed by a later piece.
text_and_raw_bytes = st.lists(
    st.one_of(st.sampled_from(PIECES).map(str.encode), st.binary(min_size=1, max_size=3)), max_size=30
).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode), text_bytes, text_and_raw_bytes)

CONFIGS = [(rule, stages) for rule in RULES for stages in (2, 3, 4)]


def toy_score(window: bytes) -> np.ndarray:
    """A causal stand-in for the entropy rule's byte model (tests/test_entropy_split.py runs the
    real one): each byte's "entropy", 0..8 bits, from the window's bytes up to it."""
    state, entropies = 0, []
    for byte in window:
        state = (state * 31 + byte + 1) % 1009
        entropies.append(8 * state / 1009)
    return np.array(entropies)


def splitter_of(rule: str, stages: int):
    """The rule's splitter with its defaults; the entropy rule's with ``toy_score``, windows of 5
    bytes (restarts within short texts), thresholds spread over 0..8 bits and a margin."""
    if rule != "entropy":
        return make_splitter(rule, stages)
    thresholds = [8 * level / stages for level in range(1, stages)]
    return make_splitter(rule, stages, score=toy_score, window=5, thresholds=thresholds, margin=3.0)


def ruler(levels) -> str:
    """Levels as one character each, "." for 0, to line up under the text in a comment."""
    return "".join(str(level) if level else "." for level in levels.tolist())


# ---------------------------------------------------------------------------------------------
# Stability and the incremental form


@pytest.mark.parametrize("rule, stages", CONFIGS)
@settings(max_examples=100, deadline=None)
@given(data=any_bytes)
def test_levels_of_every_prefix_are_a_prefix_of_the_levels(rule, stages, data):
    splitter = splitter_of(rule, stages)
    whole = splitter.levels(data)
    assert whole.dtype == np.int8 and whole.shape == (len(data),)
    assert 0 <= whole.min(initial=0) and whole.max(initial=0) < stages
    for cut in range(len(data)):
        assert splitter.levels(data[:cut]).tolist() == whole[:cut].tolist(), cut


@pytest.mark.parametrize("rule, stages", CONFIGS)
@settings(max_examples=100, deadline=None)
@given(data=any_bytes, draw=st.data())
def test_streaming_in_random_chunks_gives_the_batch_levels(rule, stages, data, draw):
    splitter = splitter_of(rule, stages)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=12)))  # repeats feed b""
    stream = splitter.stream()
    fed = [stream.feed(data[start:end]) for start, end in itertools.pairwise([0, *cuts, len(data)])]
    assert all(levels.dtype == np.int8 for levels in fed)
    assert np.concatenate(fed).tolist() == splitter.levels(data).tolist()


# ---------------------------------------------------------------------------------------------
# Word rule


def test_word_rule_by_hand():
    # 3 stages: level 1 every word, level 2 every 2nd word and punctuation, digits, newlines.
    #   The cat sat on the mat. 1234 dogs!⏎End
    #   ...1...2...1..2...1...222..21....22...
    # Words end at the spaces 3, 7, 11, 14, 18, 23, 28 and at the newline 34 ("dogs!" ends
    # there): odd words level 1, even words level 2. "." (22), "123" (24), "4" (27, digits go by
    # 3) and "!" (33) split on their first character; "!" swallows the newline after it, which is
    # level 2 as the end of the 8th word. "End" has no whitespace yet.
    levels = make_splitter("word", 3).levels(b"The cat sat on the mat. 1234 dogs!\nEnd")
    assert ruler(levels) == "...1...2...1..2...1...222..21....22..."


def test_word_rule_chunks_digits_and_punctuation_by_three_and_swallows_newlines_after_punctuation():
    #   1234567!!!!⏎⏎x⏎
    #   2..2..22..21..2
    # The first newline is only the end of a word (level 1): the match of "!" swallowed it. The last
    # one is a newline run of its own (level 2).
    assert ruler(make_splitter("word", 3).levels(b"1234567!!!!\n\nx\n")) == "2..2..22..21..2"


def test_word_rule_puts_the_newline_split_on_the_newline_not_the_spaces_before_it():
    # The paper's match of \s*[\r\n] starts at 1, a byte whose level would then depend on the
    # newline that comes two bytes later. Byte 1 stays the end of word "a" (level 1).
    assert ruler(make_splitter("word", 3).levels(b"a  \nb")) == ".1.2."


def test_word_groups_cannot_span_two_whitespace_characters_as_in_the_paper_regex():
    # "a" is followed by two spaces, so no group of 2 starts there: pairs are "b c", then "d" waits.
    text = "a  b c d "
    assert ruler(make_splitter("word", 3).levels(text.encode())) == ".1..1.2.1"
    assert [match.end() - 1 for match in regex.finditer(r"(\S+?\s){2}", text)] == [6]


def test_multibyte_characters_split_on_their_last_byte():
    data = "café «au» lait".encode()  # é = bytes 3-4, « = 6-7, » = 10-11
    levels = make_splitter("word", 2).levels(data)
    assert levels.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert make_splitter("word", 2).levels(data[:7]).tolist() == [0, 0, 0, 0, 0, 1, 0]  # « cut: held back
    assert make_splitter("word", 3).levels("ok🙂".encode()).tolist() == [0, 0, 0, 0, 0, 2]  # a symbol


def test_invalid_utf8_never_crashes_and_undecodable_bytes_never_split():
    splitter = make_splitter("word", 3)
    # \xff starts the punctuation run "\xff!!", whose split would be on \xff: undecodable bytes get
    # none. "\xe2\x82" is a cut "€" held back until the space shows it cannot complete; that space
    # ends the 2nd word (level 2).
    assert ruler(splitter.levels(b"ab\xff!! cd\xe2\x82 x")) == ".....1....2."
    assert ruler(splitter.levels(b"ab\xe2\x82")) == "...."
    for rule, stages in CONFIGS:
        assert len(splitter_of(rule, stages).levels(bytes(range(256)) * 2)) == 512


# ---------------------------------------------------------------------------------------------
# Pretokenizer rule

PAPER_PRETOKENIZER = r"( \p{L}{1,16})|\p{N}{1,3}| ?([^\s\p{L}\p{N}]){1,3}+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"


def test_pretokenizer_rule_by_hand():
    # A split at each piece's start; with 3 stages every 2nd piece is level 2.
    #   Hello  world! 12345⏎⏎  ok
    #   .....1......212..1.2.....
    # Pieces: "  " (5), "!" (12), " " (13), "123" (14), "45" (17), "⏎⏎  " (19). A letter without a
    # space before it starts no piece, so "Hello", "world" and "ok" have none.
    text = "Hello  world! 12345\n\n  ok"
    assert ruler(make_splitter("pretokenizer", 3).levels(text.encode())) == ".....1......212..1.2....."
    # The paper's pattern also splits at 6 (" world", the last space of a run before a word), at 21
    # (after the last newline) and at 22 (" ok"), each known only from the characters after it:
    paper = {match.start() for match in regex.finditer(PAPER_PRETOKENIZER, text)}
    assert paper - {5, 12, 13, 14, 17, 19} == {6, 21, 22}
    assert {match.start() for match in regex.finditer(PAPER_PRETOKENIZER, text[:7])} == {5}  # no 6 yet


def test_pretokenizer_letters_go_by_sixteen_after_a_space():
    levels = make_splitter("pretokenizer", 2).levels(b"x " + b"a" * 20 + b" b")
    assert np.flatnonzero(levels).tolist() == [1, 22]  # the 4 letters past 16 start no piece


# ---------------------------------------------------------------------------------------------
# Stride rule and configuration


def test_stride_rule_positions():
    levels = make_splitter("stride", 3, strides=(4, 16)).levels(bytes(32))
    assert ruler(levels) == "...1...1...1...2...1...1...1...2"
    # Strides count bytes, not characters.
    assert ruler(make_splitter("stride", 2, strides=(3,)).levels("ééé".encode())) == "..1..1"


def test_defaults_double_per_level():
    assert make_splitter("word", 4).groups == (1, 2, 4)
    assert make_splitter("pretokenizer", 2).groups == (1,)
    assert make_splitter("stride", 4).strides == (4, 8, 16)


@pytest.mark.parametrize(
    "rule, stages, options, message",
    [
        ("bpe", 2, {}, "rule must be one of word, pretokenizer, stride"),
        ("word", 1, {}, "stages must be an integer >= 2"),
        ("word", 3, {"groups": (1,)}, "groups must give one number per level, 2 for 3 stages"),
        ("pretokenizer", 3, {"groups": (0, 2)}, "groups must be integers >= 1"),
        ("word", 3, {"groups": (2, 2)}, "groups must increase"),
        ("stride", 2, {"strides": (4, 8)}, "strides must give one number per level"),
        ("stride", 3, {"strides": (16, 4)}, "strides must increase"),
        ("stride", 2, {"groups": (1,)}, "groups apply to the word and pretokenizer rules"),
        ("word", 2, {"strides": (4,)}, "strides apply to the stride rule"),
        ("entropy", 2, {"window": 8, "thresholds": (3.0,)}, "the entropy rule needs score, window and thresholds"),
        ("entropy", 3, {"score": toy_score, "window": 8, "thresholds": (3.0,)}, "thresholds must give one number per level"),
        ("entropy", 3, {"score": toy_score, "window": 8, "thresholds": (3.0, 3.0)}, "thresholds must be finite and increase"),
        ("entropy", 2, {"score": toy_score, "window": 0, "thresholds": (3.0,)}, "window must be an integer >= 1"),
        ("word", 2, {"window": 8}, "window: for the entropy rule, not the word rule"),
    ],
)
def test_bad_configuration_names_the_parameter(rule, stages, options, message):
    with pytest.raises(ValueError, match=message):
        make_splitter(rule, stages, **options)
