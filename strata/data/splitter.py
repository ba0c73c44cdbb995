r"""Split points for AU-Net: an integer level for every byte of the input.

AU-Net (arXiv 2506.14761) pools bytes into words, word pairs, 4-word groups. A splitter gives each
byte a level: 0 = not a split point, k >= 1 = a split point for stages 2..k+1, so with S stages the
levels run 0..S-1. The hidden vector at a split summarises the bytes up to and including that byte.
Position 0 (BOS), which must be a split at every stage, is the model's business, not the splitter's.

    splitter = make_splitter("word", stages=3)   # level 1: every word, level 2: every 2 words
    splitter.levels(b"The cat sat.")             # int8 array, one level per byte
    stream = splitter.stream()                   # the same for bytes that arrive during generation
    stream.feed(b"The c"), stream.feed(b"at sat.")

Stability. For any bytes and any cut k, ``levels(data[:k]) == levels(data)[:k]``: a byte's level
is final the moment the byte exists, because generation decides at that byte which stages to run.
Two things make this hold.

* Characters. The text rules read UTF-8 characters and put a character's split on its last byte,
  which exists once the character is complete; its other bytes are 0. Bytes are decoded as
  Python's incremental decoder does it, with ``errors="surrogateescape"``: up to 3 trailing bytes
  that could still become a character are held back, level 0, not yet part of the text. If the
  character completes they are its non-final bytes, 0 for good. If it cannot complete they
  become undecodable bytes, each one lone surrogate (U+DC80..U+DCFF). Rule for undecodable
  bytes: they count as characters that are neither space, letter nor digit (punctuation, for the
  rules), but never carry a split themselves, so the 0 they got while held back stays right.
  Decoding never fails.
* Rules. Each rule decides a character's level from that character and the ones before it. The
  paper's regexes nearly do; the exceptions are changed as described below.

Rules. ``groups`` and ``strides`` give one number per level 1..S-1.

``word``, the paper's released rule; groups default to 1, 2, 4, ... words per split.
  * Level k: the whitespace character that ends every ``groups[k-1]``-th word, the last
    character of each match of ``(\S+?\s){g}`` (regex.finditer). As in the paper, a group cannot
    span two whitespace characters in a row: the regex's unfinished groups fail there and counting
    starts again at the next word. A trailing word gets no split until its whitespace arrives.
  * Deepest level: punctuation runs, digit groups and newlines, split on the first character of
    each match of ``\p{N}{1,3}|[^\s\p{L}\p{N}]{1,3}[\r\n]*|\s*[\r\n]``. Deviation: a match of
    the last alternative may start at spaces before its newline, and whether a space starts one
    depends on the newline to come, so that split goes on the match's first newline instead.
    The greedy parts of this regex only decide where a match ends, never where one starts, so
    they need no change: digits and punctuation are chunked by 3 from the start of their run,
    punctuation swallows the newlines right after it (``"!\n"`` is one split), and
    ``\s*[\r\n]`` swallows the rest of its whitespace run up to its last newline (at most one
    newline split per whitespace run).
  * Where two levels want the same byte, the deepest wins.

``pretokenizer``, the paper's appendix (GPT-4o style); groups default to 1, 2, 4, ...
  A split at the start of each match of ``( \p{L}{1,16})|\p{N}{1,3}| ?[^\s\p{L}\p{N}]{1,3}+[\r\n]*|\s+``.
  The n-th match (n = 1, 2, ...) gets the deepest level k whose ``groups[k-1]`` divides n: every
  piece, every 2nd piece, every 4th. The paper gives only the split points; levels above 1 by
  counting pieces are our choice. Deviation: the paper's pattern ends in
  ``\s*[\r\n]|\s+(?!\S)|\s+`` where this one has ``\s+``. Those alternatives also break a
  whitespace run after its last newline, and before its last character when a non-space follows
  (the space that GPT-4o glues to the next word); both breaks depend on characters that come
  after them. Here a whitespace run is one piece, split on its first character, as the paper's
  is. So ``"a   b"`` has one split where the paper has two, and after a whitespace run of two or
  more characters punctuation is split on its first character, not on the space before it.

``none``, no byte is a split: for models that place their splits themselves (AU-Net's learned
  rule, ``strata.models.chunking``); the levels still mark BOS and document starts.

``stride``, fixed stride over bytes (the paper's Hourglass-like baseline); strides default to
  4 x (1, 2, 4, ...). Byte i (0-based) gets the deepest level k with ``(i + 1) % strides[k-1] == 0``.

``entropy``, BLT's entropy patching ("Byte Latent Transformer: Patches Scale Better Than Tokens",
  Pagnoni et al., 2024), with AU-Net's convention that a split ends its segment. A small byte-level
  language model gives each byte i the entropy H_i, in bits, of its distribution of the token
  after byte i; byte i gets the deepest level k with ``H_i > thresholds[k-1]``, and with a
  ``margin`` level 1 at least where ``H_i - H_(i-1) > margin`` (BLT's relative rule; not on a
  document's first byte). H_i depends on bytes <= i only, so the levels are stable. The model
  reads the bytes in windows of ``window`` from the start (positions [kW, (k+1)W) from the start
  of theirs, BOS first), so a document and a stream compute the same function. Bytes are bytes
  here: a split may fall inside a multi-byte character, as in BLT. The model is not the data
  layer's: the splitter is given ``score(window_bytes) -> entropies`` (``strata.models.entropy``),
  which must give each byte a value that depends only on the window's bytes up to it, the same
  bits whatever follows (the scorer runs every window as one forward of one fixed shape). Whole
  texts score each window once; a stream rescores its window's bytes so far at each call, O(window)
  work per byte.

Incremental form. ``Splitter.stream()`` returns a LevelStream whose ``feed(data)`` gives the levels
of ``data`` as ``levels`` would on everything fed so far. It keeps an incremental decoder and, for
the text rules, the rule written as a state machine (the run or piece in progress, words or pieces
counted), so every byte costs constant work whatever came before. The batch form runs the regexes
above in C; the tests check that both forms agree.
"""

from __future__ import annotations

import codecs
import functools
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import regex

from strata.data import entropy_store

RULES = ("word", "pretokenizer", "stride", "none", "entropy")


def make_splitter(
    rule: str, stages: int, *, groups: Sequence[int] | None = None, strides: Sequence[int] | None = None,
    score: Callable[[bytes], np.ndarray] | None = None, window: int | None = None,
    thresholds: Sequence[float] | None = None, margin: float | None = None,
    identity: Callable[[], str] | None = None,
) -> Splitter:
    """The splitter for ``rule`` ("word", "pretokenizer", "stride", "none" or "entropy") and
    ``stages`` stages.

    ``groups`` (word, pretokenizer rules) default to 1, 2, 4, ... and ``strides`` (stride rule) to
    4, 8, 16, ..., one per level 1..stages-1. The entropy rule takes ``score``, ``window``,
    ``thresholds``, ``margin`` and ``identity`` (``EntropySplitter``) and nothing else.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    _check_stages(stages)
    entropy_keys = {"score": score, "window": window, "thresholds": thresholds, "margin": margin,
                    "identity": identity}
    if rule == "entropy":
        if groups is not None or strides is not None:
            raise ValueError("the entropy rule takes neither groups nor strides")
        if score is None or window is None or thresholds is None:
            raise ValueError("the entropy rule needs score, window and thresholds")
        return EntropySplitter(stages, score, window, tuple(thresholds), margin, identity)
    given = [key for key, value in entropy_keys.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: for the entropy rule, not the {rule} rule")
    doubling = tuple(2**level for level in range(stages - 1))
    if rule == "none":
        if groups is not None or strides is not None:
            raise ValueError("the none rule takes neither groups nor strides")
        return NoSplitter(stages)
    if rule == "stride":
        if groups is not None:
            raise ValueError("groups apply to the word and pretokenizer rules; the stride rule takes strides")
        return StrideSplitter(stages, tuple(strides) if strides is not None else tuple(4 * g for g in doubling))
    if strides is not None:
        raise ValueError(f"strides apply to the stride rule; the {rule} rule takes groups")
    splitter = WordSplitter if rule == "word" else PretokenizerSplitter
    return splitter(stages, tuple(groups) if groups is not None else doubling)


class Splitter(ABC):
    """Gives every byte a level, 0..stages-1 (see the module docstring)."""

    stages: int

    @abstractmethod
    def levels(self, data: bytes) -> np.ndarray:
        """The int8 level of each byte of ``data``."""

    @abstractmethod
    def stream(self) -> LevelStream:
        """A fresh incremental form of this splitter, for bytes that arrive a few at a time."""

    def document_levels(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        """``levels`` of each document (a training stream's documents, all at once)."""
        return [self.levels(document) for document in documents]


class LevelStream(ABC):
    """Levels of bytes fed in pieces, equal to ``Splitter.levels`` on everything fed so far."""

    @abstractmethod
    def feed(self, data: bytes) -> np.ndarray:
        """The int8 levels of the bytes of ``data``, which follow the bytes fed before."""


def _check_stages(stages: int) -> None:
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 2:
        raise ValueError(f"stages must be an integer >= 2 (bytes plus at least one pooled stage); got {stages!r}")


def _check_per_level(name: str, values: tuple[int, ...], stages: int) -> None:
    if len(values) != stages - 1:
        raise ValueError(f"{name} must give one number per level, {stages - 1} for {stages} stages; got {values}")
    if any(isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 for value in values):
        raise ValueError(f"{name} must be integers >= 1; got {values}")
    if any(shallow >= deep for shallow, deep in itertools.pairwise(values)):
        raise ValueError(f"{name} must increase from level to level, since deeper stages are coarser; got {values}")


def _periodic_levels(counts: np.ndarray, periods: tuple[int, ...]) -> np.ndarray:
    """For each count, the deepest level k whose period ``periods[k-1]`` divides it (0 if none)."""
    levels = np.zeros(len(counts), np.int8)
    for level, period in enumerate(periods, 1):
        levels[counts % period == 0] = level  # deeper levels come later and overwrite
    return levels


def _deepest_level(count: int, periods: tuple[int, ...]) -> int:
    """``_periodic_levels`` for one count."""
    return max((level for level, period in enumerate(periods, 1) if count % period == 0), default=0)


# ---------------------------------------------------------------------------------------------
# No rule


@dataclass
class NoSplitter(Splitter):
    """Level 0 for every byte."""

    stages: int

    def __post_init__(self) -> None:
        _check_stages(self.stages)

    def levels(self, data: bytes) -> np.ndarray:
        return np.zeros(len(data), np.int8)

    def stream(self) -> LevelStream:
        return _NoSplitStream()


class _NoSplitStream(LevelStream):
    def feed(self, data: bytes) -> np.ndarray:
        return np.zeros(len(data), np.int8)


# ---------------------------------------------------------------------------------------------
# Stride rule


@dataclass
class StrideSplitter(Splitter):
    """Byte i gets the deepest level k with (i + 1) % strides[k-1] == 0."""

    stages: int
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        self.strides = tuple(self.strides)
        _check_stages(self.stages)
        _check_per_level("strides", self.strides, self.stages)

    def levels(self, data: bytes) -> np.ndarray:
        return _periodic_levels(np.arange(1, len(data) + 1), self.strides)

    def stream(self) -> LevelStream:
        return _StrideStream(self.strides)


class _StrideStream(LevelStream):
    def __init__(self, strides: tuple[int, ...]):
        self.strides = strides
        self.fed = 0

    def feed(self, data: bytes) -> np.ndarray:
        levels = _periodic_levels(np.arange(self.fed + 1, self.fed + len(data) + 1), self.strides)
        self.fed += len(data)
        return levels


# ---------------------------------------------------------------------------------------------
# Entropy rule


@dataclass
class EntropySplitter(Splitter):
    """Byte i gets the deepest level k with H_i > thresholds[k-1], H_i = ``score``'s entropy of
    the token after it; with ``margin``, level 1 at least where H_i - H_(i-1) > margin. ``score``
    is called on one window of at most ``window`` bytes at a time (module docstring).
    ``identity()``, when given, names the scorer (a digest of its weights): ``document_levels``
    then keeps the entropies of large texts on disk under it (``strata.data.entropy_store``)."""

    stages: int
    score: Callable[[bytes], np.ndarray]
    window: int
    thresholds: tuple[float, ...]
    margin: float | None = None
    identity: Callable[[], str] | None = None

    def __post_init__(self) -> None:
        self.thresholds = tuple(float(value) for value in self.thresholds)
        _check_stages(self.stages)
        if isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer)) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1; got {self.window!r}")
        if len(self.thresholds) != self.stages - 1:
            raise ValueError(f"thresholds must give one number per level, {self.stages - 1} for {self.stages} stages; "
                             f"got {self.thresholds}")
        if any(not np.isfinite(value) for value in self.thresholds) or any(
                deep <= shallow for shallow, deep in itertools.pairwise(self.thresholds)):
            raise ValueError(f"thresholds must be finite and increase from level to level; got {self.thresholds}")
        if self.margin is not None and not self.margin >= 0:
            raise ValueError(f"margin must be a number of bits >= 0; got {self.margin!r}")

    def entropies(self, data: bytes) -> np.ndarray:
        """H_i of every byte of ``data`` (float64), window by window."""
        windows = [self._scored(data[start : start + self.window]) for start in range(0, len(data), self.window)]
        return np.concatenate(windows) if windows else np.zeros(0, np.float64)

    def levels(self, data: bytes) -> np.ndarray:
        return self.levels_of(self.entropies(bytes(data)))

    def document_levels(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        if self.identity is None or sum(map(len, documents)) < entropy_store.STORE_MIN_BYTES:
            return super().document_levels(documents)
        identity = f"{self.identity()} window={self.window}"
        documents = [bytes(document) for document in documents]
        return [self.levels_of(entropies)
                for entropies in entropy_store.stored_entropies(identity, documents, self.entropies)]

    def levels_of(self, entropies: np.ndarray, previous: float | None = None) -> np.ndarray:
        """The levels of bytes with these entropies; ``previous``: H of the byte before them (None
        at a document's start)."""
        entropies = np.asarray(entropies, dtype=np.float64)
        # How many thresholds each entropy exceeds: the deepest level it reaches.
        levels = np.searchsorted(np.asarray(self.thresholds), entropies, side="left").astype(np.int8)
        if self.margin is not None and len(entropies):
            before = np.concatenate([[np.nan if previous is None else previous], entropies[:-1]])
            with np.errstate(invalid="ignore"):
                rise = entropies - before > self.margin  # NaN (no byte before) compares False
            levels[rise] = np.maximum(levels[rise], 1)
        return levels

    def stream(self) -> LevelStream:
        return _EntropyStream(self)

    def _scored(self, window: bytes) -> np.ndarray:
        entropies = np.asarray(self.score(window), dtype=np.float64)
        if entropies.shape != (len(window),):
            raise ValueError(f"score gave {entropies.shape} entropies for {len(window)} bytes")
        return entropies


class _EntropyStream(LevelStream):
    def __init__(self, splitter: EntropySplitter):
        self.splitter = splitter
        self.current = b""  # the bytes of the window in progress
        self.previous: float | None = None  # H of the last byte fed

    def feed(self, data: bytes) -> np.ndarray:
        data, levels, window = bytes(data), [], self.splitter.window
        while data:
            if len(self.current) == window:  # the next byte opens a window
                self.current = b""
            taken, data = data[: window - len(self.current)], data[window - len(self.current) :]
            start, self.current = len(self.current), self.current + taken
            entropies = self.splitter._scored(self.current)[start:]
            levels.append(self.splitter.levels_of(entropies, self.previous))
            self.previous = float(entropies[-1])
        return np.concatenate(levels) if levels else np.zeros(0, np.int8)

    def __deepcopy__(self, memo) -> _EntropyStream:
        """A copy that goes on on its own; the splitter (and its model) is shared, not copied."""
        copied = _EntropyStream(self.splitter)
        copied.current, copied.previous = self.current, self.previous
        return copied


# ---------------------------------------------------------------------------------------------
# Characters: decoding, classes, where each character's last byte is


def _new_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")


# The classes the rules tell apart, with the `regex` module's \s, \p{L} and \p{N}; anything else
# (punctuation, symbols, controls, undecodable bytes) is OTHER. The group names are the classes.
_NEWLINE, _SPACE, _LETTER, _DIGIT, _OTHER = "newline", "space", "letter", "digit", "other"
_CLASS = regex.compile(r"(?P<newline>[\r\n])|(?P<space>\s)|(?P<letter>\p{L})|(?P<digit>\p{N})")


@functools.cache
def _char_class(char: str) -> str:
    match = _CLASS.match(char)
    return match.lastgroup if match else _OTHER


def _is_undecodable(char: str) -> bool:
    return "\udc80" <= char <= "\udcff"


def _last_bytes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The byte index of each character's last byte, and which characters are undecodable bytes."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    undecodable = (code_points >= 0xDC80) & (code_points <= 0xDCFF)
    utf8_sizes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.cumsum(np.where(undecodable, 1, utf8_sizes)) - 1, undecodable


class _Scanner(Protocol):
    def step(self, char: str) -> int:
        """The level of ``char``, which follows the characters stepped before."""


@dataclass
class _TextSplitter(Splitter):
    """A rule over characters with ``groups`` per level: ``_char_levels`` (regexes) for whole
    texts, ``_scanner`` for streams."""

    stages: int
    groups: tuple[int, ...]

    def __post_init__(self) -> None:
        self.groups = tuple(self.groups)
        _check_stages(self.stages)
        _check_per_level("groups", self.groups, self.stages)

    def levels(self, data: bytes) -> np.ndarray:
        text = _new_decoder().decode(data, final=False)  # holds back an incomplete last character
        char_levels = self._char_levels(text)
        last_bytes, undecodable = _last_bytes(text)
        levels = np.zeros(len(data), np.int8)
        levels[last_bytes[~undecodable]] = char_levels[~undecodable]
        return levels

    def stream(self) -> LevelStream:
        return _TextStream(self._scanner())

    @abstractmethod
    def _char_levels(self, text: str) -> np.ndarray:
        """The int8 level of each character of ``text``."""

    @abstractmethod
    def _scanner(self) -> _Scanner:
        """The same rule, one character at a time."""


class _TextStream(LevelStream):
    def __init__(self, scanner: _Scanner):
        self.scanner = scanner
        self.decoder = _new_decoder()
        self.fed = 0  # bytes fed before this call
        self.decoded = 0  # bytes that have become characters; the rest are held back

    def feed(self, data: bytes) -> np.ndarray:
        levels = np.zeros(len(data), np.int8)
        for char in self.decoder.decode(data, final=False):
            level = self.scanner.step(char)
            if _is_undecodable(char):
                self.decoded += 1  # level 0; it may be a byte fed and held back in an earlier call
            else:
                self.decoded += len(char.encode())
                levels[self.decoded - 1 - self.fed] = level  # completed by a byte of this call
        self.fed += len(data)
        return levels


# ---------------------------------------------------------------------------------------------
# Word rule

_PUNCTUATION = regex.compile(r"\p{N}{1,3}|[^\s\p{L}\p{N}]{1,3}[\r\n]*|(?P<newline>\s*[\r\n])")
_FIRST_NEWLINE = regex.compile(r"[\r\n]")


@dataclass
class WordSplitter(_TextSplitter):
    """Every groups[k-1]-th word's whitespace at level k; punctuation, digits, newlines deepest."""

    def _char_levels(self, text: str) -> np.ndarray:
        levels = np.zeros(len(text), np.int8)
        for level, words in enumerate(self.groups, 1):  # deeper levels come later and overwrite
            levels[[match.end() - 1 for match in regex.finditer(rf"(?:\S+?\s){{{words}}}", text)]] = level
        for match in _PUNCTUATION.finditer(text):
            split = match.start()
            if match.group("newline"):  # on the newline, not on spaces before it that cannot know it comes
                split = _FIRST_NEWLINE.search(text, split).start()
            levels[split] = self.stages - 1
        return levels

    def _scanner(self) -> _Scanner:
        return _WordScanner(self.groups)


class _WordScanner:
    """WordSplitter one character at a time."""

    def __init__(self, groups: tuple[int, ...]):
        self.groups = groups
        self.words = 0  # words ended by a whitespace since counting last started again
        self.in_word = False
        self.word_just_ended = False  # the previous character is the whitespace that ended a word
        self.punctuation = _PunctuationScanner()

    def step(self, char: str) -> int:
        kind = _char_class(char)
        level = 0
        if kind in (_SPACE, _NEWLINE):
            if self.in_word:
                self.words += 1
                level = _deepest_level(self.words, self.groups)
            elif self.word_just_ended:  # a second whitespace in a row: unfinished groups fail
                self.words = 0
            self.word_just_ended, self.in_word = self.in_word, False
        else:
            self.word_just_ended, self.in_word = False, True
        if self.punctuation.splits(kind):
            level = len(self.groups)  # the deepest
        return level


class _PunctuationScanner:
    """``_PUNCTUATION`` one character at a time: whether a character carries a match's split."""

    def __init__(self):
        # The match in progress: "digits", "punctuation", "punctuation newlines" (the newlines
        # that punctuation swallows), "newline" (a whitespace run that has had its newline).
        self.match: str | None = None
        self.length = 0  # digits or punctuation characters in the current chunk of 3

    def splits(self, kind: str) -> bool:
        if self._continues(kind):
            return False
        self.match = {_DIGIT: "digits", _OTHER: "punctuation", _NEWLINE: "newline"}.get(kind)
        self.length = 1
        return self.match is not None

    def _continues(self, kind: str) -> bool:
        if (self.match, kind) in (("digits", _DIGIT), ("punctuation", _OTHER)) and self.length < 3:
            self.length += 1
            return True
        if self.match in ("punctuation", "punctuation newlines") and kind == _NEWLINE:
            self.match = "punctuation newlines"
            return True
        return self.match == "newline" and kind in (_SPACE, _NEWLINE)


# ---------------------------------------------------------------------------------------------
# Pretokenizer rule

_PIECE = regex.compile(r"( \p{L}{1,16})|\p{N}{1,3}| ?[^\s\p{L}\p{N}]{1,3}+[\r\n]*|\s+")
# The pieces that are runs of one class of character, and how many of them they take at most.
_PIECE_RUNS = {"letters": (_LETTER, 16), "digits": (_DIGIT, 3), "punctuation": (_OTHER, 3)}


@dataclass
class PretokenizerSplitter(_TextSplitter):
    """A split at each pretokenizer piece's start; every groups[k-1]-th piece at level k."""

    def _char_levels(self, text: str) -> np.ndarray:
        starts = [match.start() for match in _PIECE.finditer(text)]
        levels = np.zeros(len(text), np.int8)
        levels[starts] = _periodic_levels(np.arange(1, len(starts) + 1), self.groups)
        return levels

    def _scanner(self) -> _Scanner:
        return _PieceScanner(self.groups)


class _PieceScanner:
    """``_PIECE`` one character at a time, counting the pieces."""

    def __init__(self, groups: tuple[int, ...]):
        self.groups = groups
        self.pieces = 0
        # The piece in progress: "space" (a lone " " so far, which may go on as " word" or " !"),
        # "letters", "digits", "punctuation", "punctuation newlines", "spaces".
        self.piece: str | None = None
        self.length = 0  # its letters, digits or punctuation characters

    def step(self, char: str) -> int:
        kind = _char_class(char)
        if self._continues(kind):
            return 0
        self.piece, self.length = self._starts(char, kind), 1
        if self.piece is None:
            return 0
        self.pieces += 1
        return _deepest_level(self.pieces, self.groups)

    def _continues(self, kind: str) -> bool:
        if self.piece == "space" and kind in (_LETTER, _OTHER):
            self.piece = "letters" if kind == _LETTER else "punctuation"
            return True
        run_kind, most = _PIECE_RUNS.get(self.piece, (None, 0))
        if kind == run_kind and self.length < most:
            self.length += 1
            return True
        if self.piece in ("punctuation", "punctuation newlines") and kind == _NEWLINE:
            self.piece = "punctuation newlines"
            return True
        if self.piece in ("space", "spaces") and kind in (_SPACE, _NEWLINE):
            self.piece = "spaces"
            return True
        return False

    @staticmethod
    def _starts(char: str, kind: str) -> str | None:
        """The piece that ``char`` starts; a letter without a space before it starts none."""
        if char == " ":
            return "space"
        return {_SPACE: "spaces", _NEWLINE: "spaces", _DIGIT: "digits", _OTHER: "punctuation"}.get(kind)
