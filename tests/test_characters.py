"""Character-level (CUTE-style) tasks: answers checked by hand and by an independent solver, words
from a corpus, reproducible items and shots, an oracle scores 100 %, format-only models score
chance, and real tiny models (Transformer, AU-Net) answer the same through caches as without."""

import math
import re
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from strata import build_model, load_config
from strata.data import ByteTokenizer, corpus_path
from strata.evals.characters import (
    CHANCE,
    TASKS,
    Item,
    build_prompts,
    characters_markdown,
    corpus_words,
    evaluate_characters,
    make_items,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alphabet", "hello", "zebra", "tongue", "strength", "banana"]


def solve(question: str) -> str:
    """The answer to any task's question, worked out from its text alone (not with the module's code)."""
    patterns = {
        r'Spell out the word "([a-z]+)"\.': lambda word: " ".join(word),
        r'Write the word "([a-z ]+)"\.': lambda spelled: spelled.replace(" ", ""),
        r'Is there a "([a-z])" in "([a-z]+)"\?': lambda letter, word: "Yes" if letter in word else "No",
        r'Add an "([a-z])" after every "([a-z])" in "([a-z]+)"\.':
            lambda letter, after, word: re.sub(after, after + letter, word),
        r'Delete every instance of "([a-z])" in "([a-z]+)"\.': lambda letter, word: re.sub(letter, "", word),
        r'Substitute "([a-z])" with "([a-z])" in "([a-z]+)"\.':
            lambda old, new, word: word.translate(str.maketrans(old, new)),
        r'Swap "([a-z])" and "([a-z])" in "([a-z]+)"\.':
            lambda a, b, word: word.translate(str.maketrans(a + b, b + a)),
    }
    for pattern, answer in patterns.items():
        match = re.fullmatch(pattern, question)
        if match:
            return answer(*match.groups())
    raise AssertionError(f"no task asks {question!r}")


class Scripted(nn.Module):
    """A byte-level model that reads the prompt and writes ``reply(question)`` then a newline after
    the last "Answer:"; only the last position's logits matter to greedy decoding."""

    def __init__(self, reply):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=ByteTokenizer.vocab_size)
        self.unused = nn.Parameter(torch.zeros(1))  # gives generate a device
        self.reply = reply

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.config.vocab_size)
        for row, ids in enumerate(tokens.tolist()):
            line = ByteTokenizer().decode(ids).decode().rsplit("\n", 1)[-1]
            question, written = line.split(" Answer:")
            target = f" {self.reply(question)}\n"
            assert target.startswith(written), "greedy decoding went off the scripted line"
            logits[row, -1, ord(target[len(written)])] = 10.0
        return logits


class Uniform(nn.Module):
    """Constant logits: greedy decoding writes byte 0 for ever, never a newline."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=ByteTokenizer.vocab_size)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.config.vocab_size)


@pytest.fixture(scope="module")
def shakespeare() -> bytes:
    return corpus_path("shakespeare").read_bytes()


@pytest.fixture(scope="module")
def words(shakespeare) -> list[str]:
    return corpus_words(shakespeare)


@pytest.fixture(scope="module")
def opening(shakespeare) -> bytes:
    """The first 200 KB: thousands of words, quicker to read than all of it."""
    return shakespeare[:200_000]


@pytest.fixture(autouse=True)
def one_thread():
    """Greedy decoding of a few short prompts is thousands of tiny tensor operations, where a second
    OpenMP thread only adds synchronisation: 10-30x slower on a busy 2-core machine than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def tiny(family: str):
    torch.manual_seed(0)
    return build_model(load_config(ROOT / f"configs/tiny/{family}.yaml", ["model.init_std=0.1"]))


@pytest.mark.parametrize(
    ("task", "expected"),
    [  # seed 0, 4 of WORDS; checked by hand, letter by letter
        ("spell", ["b a n a n a", "t o n g u e", "h e l l o", "s t r e n g t h"]),
        ("spell_inverse", ["banana", "tongue", "hello", "strength"]),
        ("contains_char", ["Yes", "No", "Yes", "No"]),
        ("ins_char", ["baenaenae", "tqongue", "hellon", "strzength"]),
        ("del_char", ["bnn", "tonue", "hell", "stength"]),
        ("sub_char", ["bfnfnf", "qongue", "hellm", "stzength"]),
        ("swap_char", ["aebrz", "tungoe", "oellh", "ntresgth"]),
    ],
)
def test_answers_checked_by_hand(task, expected):
    questions = {
        "spell": ['Spell out the word "banana".', 'Spell out the word "tongue".', 'Spell out the word "hello".',
                  'Spell out the word "strength".'],
        "spell_inverse": ['Write the word "b a n a n a".', 'Write the word "t o n g u e".', 'Write the word "h e l l o".',
                          'Write the word "s t r e n g t h".'],
        "contains_char": ['Is there a "n" in "banana"?', 'Is there a "m" in "tongue"?', 'Is there a "l" in "hello"?',
                          'Is there a "z" in "strength"?'],
        "ins_char": ['Add an "e" after every "a" in "banana".', 'Add an "q" after every "t" in "tongue".',
                     'Add an "n" after every "o" in "hello".', 'Add an "z" after every "r" in "strength".'],
        "del_char": ['Delete every instance of "a" in "banana".', 'Delete every instance of "g" in "tongue".',
                     'Delete every instance of "o" in "hello".', 'Delete every instance of "r" in "strength".'],
        "sub_char": ['Substitute "a" with "f" in "banana".', 'Substitute "t" with "q" in "tongue".',
                     'Substitute "o" with "m" in "hello".', 'Substitute "r" with "z" in "strength".'],
        "swap_char": ['Swap "a" and "z" in "zebra".', 'Swap "o" and "u" in "tongue".', 'Swap "h" and "o" in "hello".',
                      'Swap "n" and "s" in "strength".'],
    }[task]
    assert make_items(task, WORDS, 4, seed=0) == [Item(q, a) for q, a in zip(questions, expected, strict=True)]


def test_swap_uses_letters_that_occur_once_and_delete_never_empties_a_word():
    items = make_items("swap_char", ["hello", "banana", "aab", "abc"], 2, 0)
    assert {item.question.rsplit('"', 2)[1] for item in items} == {"hello", "abc"}  # banana, aab have one unique letter
    assert make_items("del_char", ["zzz", "zzy"], 1, 0)[0].question.endswith('"zzy".')
    with pytest.raises(ValueError, match="swap_char needs 3 distinct words; only 2 of the 4 given fit it"):
        make_items("swap_char", ["hello", "banana", "aab", "abc"], 3, 0)


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_follows_from_its_question(task, words):
    items = make_items(task, words, 300, seed=5)
    assert len({item.question for item in items}) == 300
    for item in items:
        assert item.answer == solve(item.question), item
    if task == "sub_char":
        assert all(item.answer != re.findall(r'"([a-z]+)"', item.question)[-1] for item in items)
    if task == "contains_char":
        assert sum(item.answer == "Yes" for item in items) == 150


def test_corpus_words_are_whole_short_ascii_words():
    corpus = "The cat sat. CAT! o'er well-known café ab abcdefghijk abcdefghij dog2 _foo zebra\n".encode()
    assert corpus_words(corpus) == ["abcdefghij", "cat", "sat", "the", "zebra"]


def test_items_are_reproducible_by_seed():
    words = [f"{a}{b}{c}" for a in "abcd" for b in "efgh" for c in "ijkl"]
    for task in TASKS:
        items = make_items(task, words, 20, seed=3)
        assert items == make_items(task, list(reversed(words)), 20, seed=3)  # the order given is irrelevant
        assert items != make_items(task, words, 20, seed=4)
        assert build_prompts(task, items, 3, seed=1) == build_prompts(task, items, 3, seed=1)
        assert build_prompts(task, items, 3, seed=1) != build_prompts(task, items, 3, seed=2)
    with pytest.raises(ValueError, match="lowercase a-z letters only, got 'Cat'"):
        make_items("spell", ["Cat"], 1)
    with pytest.raises(ValueError, match="unknown character task 'reverse'"):
        make_items("reverse", words, 1)


@pytest.mark.parametrize("task", TASKS)
def test_prompts_hold_k_shots_of_other_items_never_the_answer(task, words):
    items = make_items(task, words, 40, seed=2)
    lines = {f"{item.question} Answer: {item.answer}" for item in items}
    for item, prompt in zip(items, build_prompts(task, items, 3, seed=0), strict=True):
        *shots, question = prompt.split("\n")
        assert question == f"{item.question} Answer:"
        assert len(shots) == 3 and set(shots) <= lines
        assert all(not shot.startswith(item.question) for shot in shots)
        if task != "contains_char":
            assert all(shot.rsplit(" Answer: ", 1)[1] != item.answer for shot in shots)
    assert build_prompts(task, items, 0) == [f"{item.question} Answer:" for item in items]
    with pytest.raises(ValueError, match="3 shots need 3 other items"):
        build_prompts(task, items[:3], 3)


def test_an_oracle_scores_every_item(opening):
    result = evaluate_characters(Scripted(solve), ByteTokenizer(), opening, n=40, use_cache=False,
                                 batch_size=5, return_items=True)
    assert set(result["tasks"]) == set(TASKS)
    for task, row in result["tasks"].items():
        assert (row["acc"], row["acc_stderr"], row["n"], row["chance"]) == (1.0, 0.0, 40, CHANCE[task])
        assert all(record["finish_reason"] == "stop" for record in row["items"])
    assert result["average"] == {"acc": 1.0, "acc_stderr": 0.0, "chance": pytest.approx(0.5 / 7)}
    assert result["shots"] == 3 and result["seed"] == 0 and result["words"] > 2_000


def test_models_that_know_only_the_format_score_chance(opening):
    """Constant logits never end a line: 0 everywhere. Always answering "Yes" gets exactly the
    half of contains_char that is "Yes", and nothing on the free-form tasks."""
    uniform = evaluate_characters(Uniform(), ByteTokenizer(), opening, n=10, use_cache=False)
    assert all(row["acc"] == 0.0 for row in uniform["tasks"].values())
    yes = evaluate_characters(Scripted(lambda question: "Yes"), ByteTokenizer(), opening, n=40,
                              use_cache=False, return_items=True)
    assert yes["tasks"]["contains_char"]["acc"] == 0.5 == CHANCE["contains_char"]
    assert yes["tasks"]["contains_char"]["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 40))
    assert all(row["acc"] == 0.0 for task, row in yes["tasks"].items() if task != "contains_char")
    markdown = characters_markdown(yes)
    assert "| contains_char | 50.0 | 7.9 | 40 | 50 |" in markdown
    assert "| **average** | **7.1** |" in markdown


@pytest.mark.parametrize("family", ["transformer", "aunet2"])
def test_real_models_answer_the_same_however_batched_and_without_caches(family, opening):
    """Every task through the cached, left-padded batches, at two batch sizes; two tasks again
    through the full-forward reference (slow: a forward per sequence per token). The lines agree."""
    model, tokenizer = tiny(family), ByteTokenizer()
    runs = [evaluate_characters(model, tokenizer, opening, n=2, shots=1, batch_size=size, return_items=True)
            for size in (8, 3)]
    runs.append(evaluate_characters(model, tokenizer, opening, tasks=["contains_char", "swap_char"], n=2, shots=1,
                                    use_cache=False, return_items=True))
    assert list(runs[0]["tasks"]) == list(TASKS) and all(row["n"] == 2 for row in runs[0]["tasks"].values())
    for run in runs[1:]:
        for task, row in run["tasks"].items():
            assert row["items"] == runs[0]["tasks"][task]["items"]


def test_bad_requests_fail_with_a_clear_message():
    corpus = b"the cat sat on the mat with a hat"
    with pytest.raises(ValueError, match="unknown character task 'reverse'"):
        evaluate_characters(Uniform(), ByteTokenizer(), corpus, tasks=["spell", "reverse"])
    with pytest.raises(ValueError, match="no words of 3-10 ASCII letters"):
        evaluate_characters(Uniform(), ByteTokenizer(), b"a to 42 o'er")
    with pytest.raises(ValueError, match="spell needs 100 distinct words; only 6 of the 6 given fit it"):
        evaluate_characters(Uniform(), ByteTokenizer(), corpus, tasks="spell")
