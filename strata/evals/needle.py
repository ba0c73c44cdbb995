"""Needle in a haystack and passkey retrieval: can the model fetch one fact from anywhere in a long context?

**Needle** ("Hybrid Architectures for Language Models", Bae et al., 2025, its evaluation
protocol). The haystack is held-out corpus text given by the caller; the needle
``The special magic {city} number is: {7 digits}.`` goes in at a depth, and the prompt ends with
the question. **Passkey** (the classic of landmark attention): the instruction ``There is an
important info hidden ...``, then ``The grass is green. The sky is blue. ...`` repeated, the key
sentence ``The pass key is NNNNN. Remember it. NNNNN is the pass key.``, and ``What is the pass
key? The pass key is``. A city and a number (or a key) are drawn for every trial.

Prompt of a cell (length L, depth d), as token ids::

    BOS instruction haystack[:b] " " needle haystack[b:] "\\n" question

**Protocols** (``protocol=``; the passkey has strata's only). Both end the prompt with the start of
the answer sentence, so even a base model answers by continuing it.

- ``"strata"`` (the default): no instruction; the question ``What is the special magic {city}
  number? The special magic {city} number is:``. Greedy decoding, up to the tokens of
  ``" {number}."`` in this tokenizer (9 for bytes, fewer for BPE) plus one spare, for a model that
  splits the digits into more pieces; a newline or EOS ends the answer early. It is right when the
  first run of digits in it is exactly the number: a different number, the number with more digits
  (``12345678``) or no digits are wrong, so a model that knows nothing scores 0 (chance for a
  7-digit exact match is 1e-7) and a model that lists numbers gains nothing.
- ``"paper"`` (the hybrid paper's run): the haystack inside ``<context>\\n ... \\n</context>``, then
  ``\\n \\nWhat is the special magic {city} number?\\n\\nThe special magic {city} number is:``; 20
  greedy tokens (only EOS ends them early), right if the number appears anywhere in them. Its grid:
  lengths 960, 1,984, ... (steps of 1,024) up to 16,320 or a given maximum (``paper_lengths``),
  depths 0-100 % in 10 % steps, 100 trials a cell.

**Lengths are tokens of the model's tokenizer**, the whole prompt including BOS, and exact: each
part is encoded on its own and the ids are concatenated, so a byte model and a BPE model asked for
4,096 get 4,096 positions each (the BPE model then sees about three times more text). The haystack
is the stretch of filler tokens that ends at a sentence or line end chosen at random and is just
long enough to fill the rest; its start is cut at a token, so it may open mid-sentence (an excerpt).
Filler shorter than the longest haystack is repeated (joined by a blank line; the passkey filler by a space).

**Depth** d is the fraction of the haystack's tokens before the needle: it goes at the boundary ``b``
nearest to ``d`` times the haystack length, where the boundaries are the haystack's two ends and
every token boundary at which a sentence (``.``, ``!`` or ``?``, then any closing quotes or brackets)
or a line ends before whitespace. So 0 is right after the instruction and 1 right before the
question, exactly; in between the needle is within half a sentence of the depth asked. The depth
reached is kept per trial. At those boundaries a byte-level BPE splits the text anyway (its
pre-tokenizer starts a new piece at whitespace after punctuation), so the ids are the text's own
encoding up to the haystack's cut start.

**Past the training length** nothing is capped (that is the point of the grid): attention with RoPE
sees positions it never trained on and usually loses the needle there, a sliding window sees only
its window and sinks directly, Mamba-2 runs at any length but keeps only what its state holds. The
result records the model's training length and the heat map marks it.

The cells are independent: trial t of cell (L, d) draws from a generator seeded by (seed, L, d, t),
so a cell's prompts are the same whichever grid it is part of.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from strata.data.documents import Document
from strata.data.tokenizer import Tokenizer
from strata.inference.generate import generate

CITIES = (
    "Accra", "Amsterdam", "Athens", "Baghdad", "Bangkok", "Berlin", "Bogota", "Boston", "Cairo", "Chicago",
    "Dakar", "Denver", "Dublin", "Hanoi", "Havana", "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos",
    "Lima", "Lisbon", "London", "Madrid", "Manila", "Miami", "Montreal", "Moscow", "Mumbai", "Nairobi",
    "Oslo", "Paris", "Prague", "Quito", "Riga", "Rome", "Santiago", "Seoul", "Sydney", "Tokyo",
    "Toronto", "Vienna", "Warsaw", "Zurich",
)
NEEDLE = "The special magic {city} number is: {number}."
NEEDLE_QUESTION = "What is the special magic {city} number? The special magic {city} number is:"
PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                       "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY = "The pass key is {number}. Remember it. {number} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
# Where a needle may go: after a sentence's end mark (and closing quotes/brackets) or a line's last
# character, before whitespace or the end of the text.
SENTENCE_END = re.compile(rb"""[.!?]['")\]]*(?=\s|\Z)|\S(?=[ \t]*(?:\r?\n|\Z))""")
DIGITS = re.compile(r"[0-9]+")
PAPER_MAX_LENGTH = 16_320

Filler = bytes | str | Sequence[Document]


@dataclass(frozen=True)
class Protocol:
    """How a retrieval prompt is framed, answered and judged, and the depths and trials it runs by
    default (module docstring)."""

    name: str
    instruction: str  # between BOS and the haystack
    sentence: str  # the needle, with {city} and {number}
    question: str  # after the haystack and a newline, with {city}
    digits: int  # of the number to find
    # None: strata's answer, its own tokens plus one spare, ended by a newline, right if its first
    # digits are the number. N: the paper's, N tokens, right if the number is anywhere in them.
    answer_tokens: int | None
    depths: tuple[float, ...]
    trials: int

    def draw(self, rng: np.random.Generator) -> tuple[str, str]:
        """A trial's city and number."""
        return CITIES[rng.integers(len(CITIES))], str(rng.integers(10 ** (self.digits - 1), 10**self.digits))

    def budget(self, tokenizer: Tokenizer, number: str) -> int:
        return self.answer_tokens or len(tokenizer.encode(f" {number}.".encode())) + 1

    @property
    def stop(self) -> tuple[str, ...]:
        return ("\n",) if self.answer_tokens is None else ()

    def correct(self, answer: str, number: str) -> bool:
        if self.answer_tokens is not None:
            return number in answer
        digits = DIGITS.search(answer)
        return digits is not None and digits.group() == number


STRATA_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PROTOCOLS = {
    "strata": Protocol("strata", "", NEEDLE, NEEDLE_QUESTION, 7, None, STRATA_DEPTHS, 3),
    "paper": Protocol("paper", "<context>\n", NEEDLE,
                      "</context>\n \nWhat is the special magic {city} number?\n\nThe special magic {city} number is:",
                      7, 20, tuple(step / 10 for step in range(11)), 100),
}
PASSKEY_PROTOCOL = Protocol("strata", PASSKEY_INSTRUCTION + "\n", PASSKEY, PASSKEY_QUESTION, 5, None, STRATA_DEPTHS, 3)


def paper_lengths(maximum: int | None = None) -> list[int]:
    """The paper's needle lengths: 960, 1,984, ... every 1,024 tokens up to 16,320 or ``maximum``."""
    maximum = PAPER_MAX_LENGTH if maximum is None else maximum
    if maximum < 960:
        raise ValueError(f"the paper's needle lengths start at 960 tokens; a maximum of {maximum} leaves none")
    return list(range(960, maximum + 1, 1024))


def needle_grid(model: torch.nn.Module, tokenizer: Tokenizer, filler: Filler, lengths: Sequence[int],
                depths: Sequence[float], trials: int = 5, seed: int = 0, use_cache: bool = True, *,
                batch_size: int = 8, name: str | None = None, protocol: str = "strata") -> dict:
    """Needle-in-a-haystack accuracy for every (length, depth) cell (see the module docstring).

    ``filler`` is held-out text: bytes, str, or documents (joined by a blank line). ``lengths`` are
    whole prompts in tokens of ``tokenizer``; ``depths`` fractions in [0, 1]. ``batch_size`` prompts
    of one length share a cached generation; ``name`` labels the model in tables and plots;
    ``protocol`` is ``"strata"`` or ``"paper"``. Returns the dict described in ``_result``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown needle protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    haystack = _Haystack(tokenizer, _filler_bytes(filler), b"\n\n")
    return _grid("needle", PROTOCOLS[protocol], model, tokenizer, haystack, lengths, depths, trials, seed, use_cache,
                 batch_size, name)


def passkey_grid(model: torch.nn.Module, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float],
                 trials: int = 5, seed: int = 0, use_cache: bool = True, *, batch_size: int = 8,
                 name: str | None = None) -> dict:
    """Passkey retrieval accuracy for every (length, depth) cell, with the same result as
    ``needle_grid``; the key is a 5-digit number and the filler the classic repeated sentences."""
    haystack = _Haystack(tokenizer, PASSKEY_FILLER.encode(), b" ")
    return _grid("passkey", PASSKEY_PROTOCOL, model, tokenizer, haystack, lengths, depths, trials, seed, use_cache,
                 batch_size, name)


class _Haystack:
    """Filler as token ids, with the token positions where the needle may go (sentence and line ends)."""

    def __init__(self, tokenizer: Tokenizer, text: bytes, joiner: bytes):
        if not text.strip():
            raise ValueError("the filler text is empty")
        self.tokenizer, self.text, self.joiner = tokenizer, text, joiner
        self._encode(1)

    def _encode(self, copies: int) -> None:
        text = self.joiner.join([self.text] * copies)
        self.copies, self.ids = copies, self.tokenizer.encode(text).astype(np.int64)
        ids, index = np.unique(self.ids, return_inverse=True)
        token_bytes = np.array([len(self.tokenizer.decode([token])) for token in ids.tolist()], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(token_bytes[index])])  # byte offset of each token boundary
        ends = np.array([match.end() for match in SENTENCE_END.finditer(text)], dtype=np.int64)
        # Token positions, ascending; never empty, as the end of the text counts as a line end.
        self.boundaries = np.flatnonzero(np.isin(starts, ends))

    def window(self, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``length`` filler ids ending at a random boundary, and the positions in them the needle
        may take (both ends included)."""
        while self.boundaries[-1] < length:
            self._encode(2 * self.copies)
        ends = self.boundaries[self.boundaries >= length]
        end = int(ends[rng.integers(len(ends))])
        inner = self.boundaries[(self.boundaries > end - length) & (self.boundaries < end)] - (end - length)
        return self.ids[end - length : end], np.concatenate([[0], inner, [length]])


def _grid(task: str, protocol: Protocol, model, tokenizer, haystack: _Haystack, lengths, depths, trials: int,
          seed: int, use_cache: bool, batch_size: int, name: str | None) -> dict:
    lengths, depths = _check_grid(lengths, depths, trials, batch_size)
    cells = []
    for length in lengths:
        length_cells = []
        for depth in depths:
            records = []
            for trial in range(trials):
                rng = np.random.default_rng([seed, length, round(depth * 1_000_000), trial])
                records.append(_prompt(protocol, tokenizer, haystack, *protocol.draw(rng), length, depth, rng))
            length_cells.append({"length": length, "depth": depth, "records": records})
        _answer(protocol, model, tokenizer, [record for cell in length_cells for record in cell["records"]], use_cache,
                batch_size)
        cells += length_cells
    return _result(task, protocol, model, tokenizer, lengths, depths, trials, seed, cells, name)


def _prompt(protocol: Protocol, tokenizer, haystack: _Haystack, city: str, number: str, length: int, depth: float,
            rng: np.random.Generator) -> dict:
    """One trial's prompt ids, its number and answer budget, and the depth the needle reached."""
    prefix = [tokenizer.bos_id, *tokenizer.encode(protocol.instruction.encode()).tolist()]
    needle_ids = tokenizer.encode(f" {protocol.sentence.format(city=city, number=number)}".encode()).tolist()
    question_ids = tokenizer.encode(f"\n{protocol.question.format(city=city)}".encode()).tolist()
    filler_length = length - len(prefix) - len(needle_ids) - len(question_ids)
    if filler_length < 0:
        raise ValueError(f"a prompt of {length} tokens has no room for filler: BOS, needle and question (and "
                         f"instruction) take {length - filler_length} tokens of the {tokenizer.kind} tokenizer; "
                         "use longer lengths")
    filler, places = haystack.window(filler_length, rng)
    at = int(places[np.argmin(np.abs(places - depth * filler_length))])  # the first of two equally near
    return {"number": number, "depth": at / filler_length if filler_length else depth,
            "ids": [*prefix, *filler[:at].tolist(), *needle_ids, *filler[at:].tolist(), *question_ids],
            "max_new_tokens": protocol.budget(tokenizer, number)}


def _answer(protocol: Protocol, model, tokenizer, records: list[dict], use_cache: bool, batch_size: int) -> None:
    """Generate each record's answer, ``batch_size`` prompts at a time, and judge it (in place)."""
    for first in range(0, len(records), batch_size):
        batch = records[first : first + batch_size]
        outputs = generate(model, [record.pop("ids") for record in batch],
                           max(record.pop("max_new_tokens") for record in batch), tokenizer=tokenizer,
                           stop=protocol.stop, use_cache=use_cache)
        for record, output in zip(batch, outputs, strict=True):
            record["output"] = output.text
            record["correct"] = protocol.correct(output.text, record["number"])


def _result(task, protocol: Protocol, model, tokenizer, lengths, depths, trials, seed, cells, name) -> dict:
    """``task`` ("needle" or "passkey"), ``protocol`` ("strata" or "paper"), ``model`` (the name
    given, or None), ``tokenizer`` (its kind), ``training_length`` (the model config's
    ``context_length``, or None), ``lengths``, ``depths``, ``trials``, ``seed``;
    ``accuracy[i][j]``: the fraction right at ``depths[i]`` and ``lengths[j]`` (rows are the heat
    map's rows); ``mean``: over all cells; ``cells``: per cell ``length``, ``depth``,
    ``accuracy``, ``correct`` and ``trials`` (each with ``number``, the ``depth`` reached, the
    generated ``output`` text and whether it is ``correct``)."""
    by_cell = {}
    for cell in cells:
        correct = sum(record["correct"] for record in cell["records"])
        by_cell[cell["length"], cell["depth"]] = {
            "length": cell["length"], "depth": cell["depth"], "accuracy": correct / trials, "correct": correct,
            "trials": cell["records"]}
    accuracy = [[by_cell[length, depth]["accuracy"] for length in lengths] for depth in depths]
    return {
        "task": task,
        "protocol": protocol.name,
        "model": name,
        "tokenizer": tokenizer.kind,
        "training_length": getattr(getattr(model, "config", None), "context_length", None),
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "accuracy": accuracy,
        "mean": float(np.mean(accuracy)),
        "cells": list(by_cell.values()),
    }


def _check_grid(lengths, depths, trials: int, batch_size: int) -> tuple[list[int], list[float]]:
    lengths, depths = list(lengths), [float(depth) for depth in depths]
    if not lengths or not depths:
        raise ValueError("the grid needs at least one length and one depth")
    bad = [length for length in lengths if isinstance(length, bool) or not isinstance(length, (int, np.integer))
           or length < 1]
    if bad:
        raise ValueError(f"lengths must be positive whole numbers of tokens, got {bad[0]!r}")
    bad = [depth for depth in depths if not 0 <= depth <= 1]
    if bad:
        raise ValueError(f"depths must be fractions of the context in [0, 1], got {bad[0]}")
    if len(set(lengths)) < len(lengths) or len(set(depths)) < len(depths):
        raise ValueError("lengths and depths must not repeat (each cell is scored once)")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return sorted(int(length) for length in lengths), sorted(depths)


def _filler_bytes(filler: Filler) -> bytes:
    if isinstance(filler, bytes):
        return filler
    if isinstance(filler, str):
        return filler.encode()
    if all(isinstance(document, Document) for document in filler):
        return b"\n\n".join(document.text for document in filler)
    raise TypeError("filler must be bytes, str or a list of Documents")


_TITLES = {"needle": "Needle in a haystack", "passkey": "Passkey retrieval"}


def _percent(depth: float) -> str:
    """12.5% stays 12.5%, 50% stays 50%."""
    return f"{depth * 100:.4g}%"


def needle_markdown(result: dict) -> str:
    """The accuracy grid as a Markdown table: a row per depth, a column per length, in percent."""
    header = [f"{length:,}" for length in result["lengths"]]
    lines = [f"| depth \\ length | {' | '.join(header)} |", "|---|" + "---:|" * len(header)]
    for depth, row in zip(result["depths"], result["accuracy"], strict=True):
        lines.append(f"| {_percent(depth)} | " + " | ".join(f"{value:.0%}" for value in row) + " |")
    columns = np.mean(result["accuracy"], axis=0)
    lines.append("| **mean** | " + " | ".join(f"{value:.0%}" for value in columns) + " |")
    model = f" of {result['model']}" if result["model"] else ""
    trained = f", trained at {result['training_length']:,}" if result["training_length"] else ""
    caption = (f"{_TITLES[result['task']]}{model}: {result['mean']:.1%} over all cells; {result['trials']} trials "
               f"a cell; lengths in tokens of the {result['tokenizer']} tokenizer{trained}; "
               f"{result['protocol']} protocol.")
    return "\n".join([caption, "", *lines])


def plot_heatmap(result: dict, path: str | Path) -> Path:
    """Write the accuracy grid as a heat map PNG (x: context length, y: depth, each cell annotated),
    with a dashed line where the lengths pass the model's training length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure on its own Agg canvas: no pyplot, so the caller's global backend is left alone.
    accuracy = np.array(result["accuracy"]) * 100
    lengths, depths = result["lengths"], result["depths"]
    figure = Figure(figsize=(max(5.0, 1.1 * len(lengths) + 2.5), max(3.5, 0.45 * len(depths) + 2)))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(accuracy, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for row in range(len(depths)):
        for column in range(len(lengths)):
            value = accuracy[row, column]
            axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=9,
                      color="white" if value < 20 or value > 80 else "black")
    axes.set_xticks(range(len(lengths)), [f"{length:,}" for length in lengths])
    axes.set_yticks(range(len(depths)), [_percent(depth) for depth in depths])
    axes.set_xlabel(f"context length (tokens, {result['tokenizer']} tokenizer)")
    axes.set_ylabel("needle depth")
    subtitle = f"mean {result['mean']:.0%}, {result['trials']} trials a cell, {result['protocol']} protocol"
    trained = result["training_length"]
    if trained is not None and lengths[0] <= trained < lengths[-1]:
        axes.axvline(sum(length <= trained for length in lengths) - 0.5, color="black", linestyle="--", linewidth=1.2)
        subtitle += f"; dashed: training length {trained:,}"
    model = f" — {result['model']}" if result["model"] else ""
    axes.set_title(f"{_TITLES[result['task']]}{model}\n{subtitle}", fontsize=10)
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
