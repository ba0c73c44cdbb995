"""Character-level tasks in the style of CUTE (Edman et al. 2024, "CUTE: Measuring LLMs'
Understanding of Their Tokens"): can a model spell a word, read a spelling back, and find and edit
the letters of a word? A byte model sees every letter; a BPE model has to have learnt what is
inside its tokens ("From Bytes to Ideas: Language Modeling with Autoregressive U-Nets", Videau et
al., 2025, compares the two on CUTE).

Words come from a corpus the caller passes (``corpus_words``): maximal runs of 3-10 ASCII letters,
lowercased and deduplicated. A run touching a digit, underscore, apostrophe, hyphen or non-ASCII
byte is skipped whole, so contractions ("o'er"), compounds and accented words leave no fragments.
Items draw from the distinct words uniformly, so rare words are as likely as common ones (CUTE
takes the most frequent English words of at least 3 letters instead).

The seven tasks follow CUTE's character tasks (its ``gen_char_tasks.py`` and ``prompts.py``); the
question text is CUTE's, the answer unquoted so that the line's newline ends it::

    spell          Spell out the word "cat". Answer: c a t
    spell_inverse  Write the word "c a t". Answer: cat
    contains_char  Is there a "a" in "cat"? Answer: Yes
    ins_char       Add an "e" after every "a" in "cat". Answer: caet
    del_char       Delete every instance of "a" in "cat". Answer: ct
    sub_char       Substitute "a" with "o" in "cat". Answer: cot
    swap_char      Swap "c" and "t" in "cat". Answer: tac

As in CUTE: contains_char asks for a letter of the word ("Yes") or a letter of a-z not in it
("No"); ins_char puts a random letter of a-z (possibly the same one) after every occurrence of a
letter of the word; del_char deletes every occurrence of a letter of the word; swap_char swaps two
letters that each occur exactly once in the word, so the answer is unambiguous. Three choices
differ from CUTE, each to make a score mean what it says: sub_char's new letter is never the old
one (CUTE's may be, leaving the word unchanged); del_char skips words of a single repeated letter
(the answer would be empty); contains_char has exactly half its items "Yes" (``n`` odd: one more
"Yes"), shuffled, so a model that always says one of the two scores 50 % (``chance``), where
CUTE draws each label at random. Words that a task cannot use (del_char, swap_char) are left out
before sampling.

Prompt (k shots, drawn per question from the *other* items of the same task with a fixed seed; a
shot never has the question's answer, except on contains_char whose answers are only Yes and No)::

    <shot 1 question> Answer: <shot 1 answer>\\n ... <shot k question> Answer: <answer k>\\n<question> Answer:

CUTE's instruction sentence is left out: the shots show the task, as for any base model. The
prompt is ``[BOS] + encode(prompt)`` and the model continues greedily until it writes a newline
(or EOS). The item is correct when that line, stripped of surrounding whitespace, equals the answer
exactly; a line still open after the answer's UTF-8 length plus ``SLACK_TOKENS`` tokens is wrong
(every token holds at least one byte, so that is room for the answer in any tokenisation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strata.data.tokenizer import Tokenizer
from strata.inference.generate import generate

TASKS = ("spell", "spell_inverse", "contains_char", "ins_char", "del_char", "sub_char", "swap_char")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# What a model that knows the format but not the word scores: one of Yes/No always (or at random)
# is right half the time; a guessed free-form answer almost never.
CHANCE = {task: 0.5 if task == "contains_char" else 0.0 for task in TASKS}
SLACK_TOKENS = 8
_WORD = re.compile(rb"(?<![A-Za-z0-9_'\x80-\xff-])[A-Za-z]{3,10}(?![A-Za-z0-9_'\x80-\xff-])")
_LOWERCASE_WORD = re.compile("[a-z]+")


@dataclass(frozen=True)
class Item:
    question: str  # 'Spell out the word "cat".'
    answer: str  # "c a t"


def corpus_words(corpus: bytes) -> list[str]:
    """The distinct words of ``corpus`` (see the module docstring), lowercased, sorted."""
    return sorted({word.decode("ascii").lower() for word in _WORD.findall(corpus)})


def make_items(task: str, words: list[str], n: int, seed: int = 0) -> list[Item]:
    """``n`` items of ``task``, each from a different word of ``words`` (lowercase a-z words).

    The items depend only on the set of words, ``n`` and ``seed``: the words are sorted first, so
    the order a caller lists them in does not matter.
    """
    if task not in TASKS:
        raise ValueError(f"unknown character task {task!r} (tasks: {', '.join(TASKS)})")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bad = next((word for word in words if not _LOWERCASE_WORD.fullmatch(word)), None)
    if bad is not None:
        raise ValueError(f"words must be lowercase a-z letters only, got {bad!r}")
    usable = [word for word in sorted(set(words)) if _usable(task, word)]
    if len(usable) < n:
        raise ValueError(f"{task} needs {n} distinct words; only {len(usable)} of the {len(set(words))} given fit it")
    rng = np.random.default_rng(seed)
    chosen = [usable[index] for index in rng.choice(len(usable), size=n, replace=False)]
    if task == "contains_char":
        labels = rng.permutation(["Yes"] * (n - n // 2) + ["No"] * (n // 2))
        return [_contains(word, label == "Yes", rng) for word, label in zip(chosen, labels, strict=True)]
    make = {"spell": _spell, "spell_inverse": _spell_inverse, "ins_char": _insert, "del_char": _delete,
            "sub_char": _substitute, "swap_char": _swap}[task]
    return [make(word, rng) for word in chosen]


def build_prompts(task: str, items: list[Item], shots: int = 3, seed: int = 0) -> list[str]:
    """Each item's prompt with ``shots`` examples from the other items (module docstring).

    Item i's shots depend only on (seed, i) and the items, as in ``multiple_choice.build_prompts``.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    prompts = []
    for index, item in enumerate(items):
        others = [other for other in range(len(items)) if other != index
                  and (task == "contains_char" or items[other].answer != item.answer)]
        if len(others) < shots:
            raise ValueError(f"{shots} shots need {shots} other items of {task} with a different answer; "
                             f"item {index} has {len(others)} (use more items or fewer shots)")
        picked = np.random.default_rng([seed, index]).choice(others, size=shots, replace=False)
        lines = [f"{items[other].question} Answer: {items[other].answer}" for other in picked]
        prompts.append("\n".join([*lines, f"{item.question} Answer:"]))
    return prompts


def evaluate_characters(model, tokenizer: Tokenizer, corpus: bytes, tasks: str | Sequence[str] = TASKS,
                        n: int = 100, shots: int = 3, seed: int = 0, use_cache: bool = True, batch_size: int = 16,
                        return_items: bool = False) -> dict:
    """Exact-match accuracy of greedy answers on each of ``tasks`` (from ``TASKS``), ``n`` items each.

    Returns ``{"tasks": {task: {"acc", "acc_stderr", "n", "chance"}}, "average": {"acc",
    "acc_stderr", "chance"}, "shots", "seed", "words"}`` where ``words`` is how many distinct
    words the corpus gave and ``average`` is the unweighted mean over tasks (its standard error
    from the tasks' binomial ones, the tasks being independent samples). With ``return_items``
    each task also has ``items``: question, answer, output line, finish reason and correctness.
    Prompts of all tasks go through ``generate`` together, ``batch_size`` at a time, in order of
    length so a batch holds little padding; ``use_cache=False`` is the slow reference.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown character task {unknown[0]!r} (tasks: {', '.join(TASKS)})")
    if not tasks or len(set(tasks)) < len(tasks):
        raise ValueError(f"tasks must be one or more distinct names, got {tasks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    words = corpus_words(corpus)
    if not words:
        raise ValueError("the corpus has no words of 3-10 ASCII letters to make character tasks from")
    jobs = []  # (task, item, prompt)
    for task in tasks:
        items = make_items(task, words, n, seed)
        jobs.extend((task, item, prompt) for item, prompt in zip(items, build_prompts(task, items, shots, seed),
                                                                 strict=True))
    lines = _answer_lines(model, tokenizer, [prompt for _, _, prompt in jobs],
                          [_budget(item) for _, item, _ in jobs], use_cache, batch_size)

    per_task: dict[str, list[dict]] = {task: [] for task in tasks}
    for (task, item, _), (text, reason, finished) in zip(jobs, lines, strict=True):
        per_task[task].append({"question": item.question, "answer": item.answer, "output": text,
                               "finish_reason": reason, "correct": finished and text.strip() == item.answer})
    results = {}
    for task, records in per_task.items():
        acc = sum(record["correct"] for record in records) / len(records)
        results[task] = {"acc": acc, "acc_stderr": _stderr(acc, len(records)), "n": len(records),
                         "chance": CHANCE[task]}
        if return_items:
            results[task]["items"] = records
    average = {
        "acc": sum(result["acc"] for result in results.values()) / len(results),
        "acc_stderr": math.sqrt(sum(result["acc_stderr"] ** 2 for result in results.values())) / len(results),
        "chance": sum(result["chance"] for result in results.values()) / len(results),
    }
    return {"tasks": results, "average": average, "shots": shots, "seed": seed, "words": len(words)}


def characters_markdown(result: dict) -> str:
    """A Markdown table: accuracy in percent with its standard error per task, the average under it."""
    lines = ["| task | acc (%) | ± | n | chance (%) |", "|---|---:|---:|---:|---:|"]
    for task, row in result["tasks"].items():
        lines.append(f"| {task} | {100 * row['acc']:.1f} | {100 * row['acc_stderr']:.1f} | {row['n']} "
                     f"| {100 * row['chance']:.0f} |")
    average = result["average"]
    lines.append(f"| **average** | **{100 * average['acc']:.1f}** | {100 * average['acc_stderr']:.1f} | "
                 f"| {100 * average['chance']:.1f} |")
    lines.append("")
    lines.append(f"Exact match of the greedy answer line, {result['shots']}-shot, seed {result['seed']}, "
                 f"words from {result['words']} distinct corpus words.")
    return "\n".join(lines) + "\n"


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def _usable(task: str, word: str) -> bool:
    if task == "del_char":
        return len(set(word)) > 1
    if task == "swap_char":
        return sum(word.count(letter) == 1 for letter in set(word)) >= 2
    return True


def _pick(rng: np.random.Generator, options) -> str:
    """One of ``options`` (sorted first, so a set gives the same pick on every run)."""
    options = sorted(options)
    return options[rng.integers(len(options))]


def _spell(word: str, rng) -> Item:
    return Item(f'Spell out the word "{word}".', " ".join(word))


def _spell_inverse(word: str, rng) -> Item:
    return Item(f'Write the word "{" ".join(word)}".', word)


def _contains(word: str, present: bool, rng) -> Item:
    letter = _pick(rng, set(word) if present else set(LETTERS) - set(word))
    return Item(f'Is there a "{letter}" in "{word}"?', "Yes" if present else "No")


def _insert(word: str, rng) -> Item:
    after, letter = _pick(rng, set(word)), _pick(rng, LETTERS)
    return Item(f'Add an "{letter}" after every "{after}" in "{word}".', word.replace(after, after + letter))


def _delete(word: str, rng) -> Item:
    letter = _pick(rng, set(word))
    return Item(f'Delete every instance of "{letter}" in "{word}".', word.replace(letter, ""))


def _substitute(word: str, rng) -> Item:
    old = _pick(rng, set(word))
    new = _pick(rng, set(LETTERS) - {old})
    return Item(f'Substitute "{old}" with "{new}" in "{word}".', word.replace(old, new))


def _swap(word: str, rng) -> Item:
    once = sorted(letter for letter in set(word) if word.count(letter) == 1)
    first, second = (once[index] for index in rng.choice(len(once), size=2, replace=False))
    i, j = word.index(first), word.index(second)
    letters = list(word)
    letters[i], letters[j] = second, first
    return Item(f'Swap "{first}" and "{second}" in "{word}".', "".join(letters))


def _budget(item: Item) -> int:
    """Tokens an answer line may take: its bytes (a space, the answer, a newline) plus slack."""
    return len(f" {item.answer}\n".encode()) + SLACK_TOKENS


def _answer_lines(model, tokenizer, prompts: list[str], budgets: list[int], use_cache: bool,
                  batch_size: int) -> list[tuple[str, str, bool]]:
    """Each prompt's greedy line: (text without the newline, finish reason, ended within budget).

    A call to ``generate`` has one token limit, the largest budget of its batch; a line still open
    at its own budget is cut there and counts as "length", so neither the batching nor the other
    tasks evaluated change any line or verdict.
    """
    lines: list[tuple[str, str, bool]] = [("", "", False)] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        generations = generate(model, [prompts[index] for index in batch], max(budgets[index] for index in batch),
                               stop="\n", tokenizer=tokenizer, use_cache=use_cache)
        for index, generation in zip(batch, generations, strict=True):
            budget = budgets[index]
            if generation.finish_reason != "length" and len(generation.tokens) <= budget:
                lines[index] = (generation.text, generation.finish_reason, True)
            else:
                text = tokenizer.decode(generation.tokens[:budget]).decode("utf-8", errors="replace")
                lines[index] = (text, "length", False)
    return lines
