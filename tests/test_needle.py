"""Needle in a haystack and passkey retrieval: prompts of the asked length and depth, exact-match
scoring against models that know (100 %) or do not know (0 %) the answer, the paper's protocol
against its literal prompt, grid and scoring rule, tables and heat maps."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from strata import build_model, load_config
from strata.data import BPETokenizer, ByteTokenizer, Document, corpus_path
from strata.evals.needle import (
    PROTOCOLS,
    _Haystack,
    _prompt,
    needle_grid,
    needle_markdown,
    paper_lengths,
    passkey_grid,
    plot_heatmap,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
# Filler whose sentences are all alike, so a depth can be read off the sentences before the needle.
EVEN = " ".join(f"Here is filler line {i:04d} of the test haystack." for i in range(400)).encode()
SENTENCE_END = re.compile(rb"""[.!?]['")\]]*$""")


@pytest.fixture(scope="module")
def shakespeare() -> bytes:
    return corpus_path("shakespeare").read_bytes()


@pytest.fixture(scope="module")
def filler(shakespeare) -> bytes:
    """The last 60 KB: text the BPE below never saw, as held-out filler should be."""
    return shakespeare[-60_000:]


@pytest.fixture(scope="module")
def bpe(shakespeare) -> BPETokenizer:
    return BPETokenizer.train([Document("slice", shakespeare[:300_000])], 600)


@pytest.fixture(params=["bytes", "bpe"])
def tokenizer(request, bpe):
    return ByteTokenizer() if request.param == "bytes" else bpe


class Oracle(nn.Module):
    """Reads the prompt, finds the number the question asks for, and puts all its logit on the next
    token of ``answer(number)`` followed by newlines; ``answer`` bends the answer for wrong models.
    Generation reads only the last position, so every position shows the last one's logits (an
    expanded view: allocating [T, V] zeros per step is what would cost time)."""

    QUESTION = re.compile(r"\nWhat is the (.+?)\?\s+The \1 is:?")

    def __init__(self, tokenizer, answer=lambda number: number):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.anchor = nn.Parameter(torch.zeros(()))  # generate finds the device from a parameter
        self.tokenizer, self.answer = tokenizer, answer

    def forward(self, tokens, cache=None, last_only=False):
        assert cache is None, "the oracle has no cache: run it with use_cache=False"
        logits = torch.zeros(len(tokens), 1, self.config.vocab_size)
        for row, ids in enumerate(tokens.tolist()):
            text = self.tokenizer.decode(ids).decode()
            question = list(self.QUESTION.finditer(text))[-1]
            number = re.search(rf"The {re.escape(question.group(1))} is:? (\d+)\.", text[: question.start()]).group(1)
            target, written = f" {self.answer(number)}\n", text[question.end() :]
            assert target.startswith(written) or written.startswith(target), (target, written)
            logits[row, 0, int(self.tokenizer.encode((target[len(written) :] or "\n").encode())[0])] = 1.0
        return logits.expand(*tokens.shape, -1)


class Uniform(nn.Module):
    """Equal logits everywhere: greedy decoding then repeats id 0, which is no digit."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, cache=None, last_only=False):
        return torch.zeros(self.config.vocab_size).expand(*tokens.shape, -1)


def needle_prompt(tokenizer, haystack, length, depth, seed=0):
    strata = PROTOCOLS["strata"]
    rng = np.random.default_rng(seed)
    record = _prompt(strata, tokenizer, haystack, "Oslo", strata.draw(rng)[1], length, depth, rng)
    needle = tokenizer.encode(f" The special magic Oslo number is: {record['number']}.".encode()).tolist()
    question = tokenizer.encode(b"\nWhat is the special magic Oslo number? The special magic Oslo number is:").tolist()
    ids = record["ids"]
    at = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
    assert ids[-len(question) :] == question
    return ids, at - 1, length - 1 - len(needle) - len(question), record  # needle position in the haystack, its length


# ---------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("length", [150, 600, 2000])
def test_prompt_has_the_asked_length_and_the_needle_at_a_sentence_end(tokenizer, filler, length):
    haystack = _Haystack(tokenizer, filler, b"\n\n")
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ids, at, filler_length, record = needle_prompt(tokenizer, haystack, length, depth)
        assert len(ids) == length and ids[0] == tokenizer.bos_id
        text = tokenizer.decode(ids)
        # The text's own encoding has the same length, give or take the merges at the cut start.
        assert abs(len(tokenizer.encode(text)) + 1 - length) <= 2
        before, after = tokenizer.decode(ids[1 : at + 1]), tokenizer.decode(ids[at + 1 :])
        needle = f" The special magic Oslo number is: {record['number']}.".encode()
        assert after.startswith(needle)
        # At the start, after a sentence, or at the end of a line (which may end in a comma).
        assert at == 0 or SENTENCE_END.search(before) or re.match(rb"[ \t]*\r?\n", after[len(needle) :]), before[-40:]
        assert record["depth"] == pytest.approx(at / filler_length)
    assert needle_prompt(tokenizer, haystack, length, 0.0)[1] == 0
    _, at, filler_length, _ = needle_prompt(tokenizer, haystack, length, 1.0)
    assert at == filler_length  # right before the question


@pytest.mark.parametrize("depth", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_needle_lands_within_a_sentence_of_the_depth(tokenizer, depth):
    haystack = _Haystack(tokenizer, EVEN, b" ")
    sentence_tokens = len(tokenizer.encode(b" Here is filler line 0123 of the test haystack."))
    for seed in range(3):
        _, at, filler_length, _ = needle_prompt(tokenizer, haystack, 1500, depth, seed)
        assert abs(at - depth * filler_length) <= sentence_tokens / 2 + 1


def test_short_filler_is_repeated_and_too_short_lengths_are_refused():
    tokenizer = ByteTokenizer()
    haystack = _Haystack(tokenizer, b"One sentence. Another one.", b"\n\n")
    ids, _, _, _ = needle_prompt(tokenizer, haystack, 1000, 0.5)
    assert len(ids) == 1000 and tokenizer.decode(ids).count(b"Another one.") > 20
    with pytest.raises(ValueError, match=r"of 100 tokens has no room for filler: .* take 1[0-9][0-9] tokens of the bytes tokenizer"):
        needle_grid(Uniform(259), tokenizer, b"Filler.", [100], [0.5])
    with pytest.raises(ValueError, match=r"depths must be fractions of the context in \[0, 1\], got 1.5"):
        needle_grid(Uniform(259), tokenizer, b"Filler.", [300], [1.5])
    with pytest.raises(ValueError, match="the filler text is empty"):
        needle_grid(Uniform(259), tokenizer, b" \n ", [300], [0.5])


# ---------------------------------------------------------------------------------------------
# Scoring


def test_oracle_scores_every_cell_and_uniform_none(tokenizer, filler):
    grid = {"lengths": [200, 500], "depths": [0.0, 0.5, 1.0], "trials": 2, "seed": 3, "use_cache": False}
    knows = needle_grid(Oracle(tokenizer), tokenizer, filler, **grid)
    assert knows["mean"] == 1.0 and knows["accuracy"] == [[1.0, 1.0]] * 3
    cell = knows["cells"][0]
    assert (cell["length"], cell["depth"], cell["correct"]) == (200, 0.0, 2)
    assert all(trial["output"] == f" {trial['number']}" for trial in cell["trials"])
    blank = needle_grid(Uniform(tokenizer.vocab_size), tokenizer, filler, **grid)
    assert blank["mean"] == 0.0
    # Same seed, same needles, whatever the model.
    assert [t["number"] for c in blank["cells"] for t in c["trials"]] == \
        [t["number"] for c in knows["cells"] for t in c["trials"]]


@pytest.mark.parametrize("answer", [lambda n: str(int(n) + 1), lambda n: n + "0", lambda n: n[:-1],
                                    lambda n: "42 " + n])
def test_a_near_miss_is_wrong(answer, filler):
    tokenizer = ByteTokenizer()
    result = needle_grid(Oracle(tokenizer, answer), tokenizer, filler, [300], [0.5], trials=2, use_cache=False)
    assert result["mean"] == 0.0


def test_passkey_oracle_and_prompt():
    tokenizer = ByteTokenizer()
    result = passkey_grid(Oracle(tokenizer), tokenizer, [300, 700], [0.0, 1.0], trials=2, use_cache=False)
    assert result["task"] == "passkey" and result["mean"] == 1.0
    assert all(len(t["number"]) == 5 for c in result["cells"] for t in c["trials"])
    assert passkey_grid(Uniform(259), tokenizer, [300], [0.5], trials=2, use_cache=False)["mean"] == 0.0


def test_grids_are_deterministic_and_cells_independent(filler):
    tokenizer = ByteTokenizer()

    def numbers(result):
        return {(c["length"], c["depth"]): [(t["number"], t["depth"]) for t in c["trials"]] for c in result["cells"]}

    model = Uniform(259)
    small = needle_grid(model, tokenizer, filler, [300], [0.5], trials=3, seed=7, use_cache=False)
    large = needle_grid(model, tokenizer, filler, [400, 300], [0.5, 0.0], trials=3, seed=7, use_cache=False)
    assert numbers(small) == numbers(needle_grid(model, tokenizer, filler, [300], [0.5], trials=3, seed=7,
                                                 use_cache=False))
    assert numbers(small)[300, 0.5] == numbers(large)[300, 0.5]
    assert large["lengths"] == [300, 400] and large["depths"] == [0.0, 0.5]  # sorted
    other = needle_grid(model, tokenizer, filler, [300], [0.5], trials=3, seed=8, use_cache=False)
    assert numbers(other) != numbers(small)


# ---------------------------------------------------------------------------------------------
# The paper's protocol ("Hybrid Architectures for Language Models" (Bae et al., 2025), its evaluation protocol), against its literal grid, prompt and scoring rule

# Filler "One. Two. Three." with the needle at depth 0.5 (after "Two.") and 1.0 (after "Three.").
PAPER_PROMPTS = {
    0.5: "<context>\nOne. Two. The special magic Oslo number is: 1234567. Three.\n</context>\n \n"
         "What is the special magic Oslo number?\n\nThe special magic Oslo number is:",
    1.0: "<context>\nOne. Two. Three. The special magic Oslo number is: 1234567.\n</context>\n \n"
         "What is the special magic Oslo number?\n\nThe special magic Oslo number is:",
}


def test_paper_grid_is_the_papers():
    paper = PROTOCOLS["paper"]
    assert paper_lengths() == [960, 1984, 3008, 4032, 5056, 6080, 7104, 8128, 9152, 10176, 11200, 12224, 13248,
                               14272, 15296, 16320]
    assert paper_lengths(4096) == [960, 1984, 3008, 4032]
    assert paper.depths == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert paper.trials == 100 and paper.answer_tokens == 20
    with pytest.raises(ValueError, match="needle lengths start at 960 tokens; a maximum of 500 leaves none"):
        paper_lengths(500)


@pytest.mark.parametrize("depth", sorted(PAPER_PROMPTS))
def test_paper_prompt_is_the_papers_text(depth):
    tokenizer = ByteTokenizer()
    haystack = _Haystack(tokenizer, b"One. Two. Three.", b"\n\n")
    length = 1 + len(PAPER_PROMPTS[depth])  # BOS and the prompt: the filler fits exactly, once
    record = _prompt(PROTOCOLS["paper"], tokenizer, haystack, "Oslo", "1234567", length, depth,
                     np.random.default_rng(0))
    assert record["ids"][0] == tokenizer.bos_id and len(record["ids"]) == length
    assert tokenizer.decode(record["ids"][1:]).decode() == PAPER_PROMPTS[depth]
    assert record["max_new_tokens"] == 20


def test_paper_prompt_has_the_asked_length(tokenizer, filler):
    haystack = _Haystack(tokenizer, filler, b"\n\n")
    rng = np.random.default_rng(0)
    record = _prompt(PROTOCOLS["paper"], tokenizer, haystack, "Oslo", "1234567", 960, 0.3, rng)
    text = tokenizer.decode(record["ids"]).decode()
    assert len(record["ids"]) == 960 and record["ids"][0] == tokenizer.bos_id
    assert text.startswith("<context>\n") and " The special magic Oslo number is: 1234567." in text
    assert text.endswith("\n</context>\n \nWhat is the special magic Oslo number?\n\nThe special magic Oslo number is:")


def test_paper_scoring_accepts_the_number_anywhere():
    paper, strata = PROTOCOLS["paper"], PROTOCOLS["strata"]
    assert paper.correct(" It is 42, or rather 1234567 ...", "1234567")
    assert not paper.correct(" 7654321", "1234567") and not paper.correct(" 123456.", "1234567")
    assert not strata.correct(" It is 42, or rather 1234567 ...", "1234567")  # strata's: the first digits only


@pytest.mark.parametrize(("answer", "accuracy"), [(lambda n: n, 1.0), (lambda n: "42 or " + n, 1.0),
                                                  (lambda n: str(int(n) + 1), 0.0)])
def test_paper_grid_answers_20_tokens_and_finds_the_number_anywhere(answer, accuracy, filler):
    tokenizer = ByteTokenizer()
    result = needle_grid(Oracle(tokenizer, answer), tokenizer, filler, [960], [0.0, 1.0], trials=2, use_cache=False,
                         protocol="paper")
    assert result["protocol"] == "paper" and result["mean"] == accuracy
    outputs = [trial["output"] for cell in result["cells"] for trial in cell["trials"]]
    assert all(len(output) == 20 for output in outputs)  # byte tokens: past the answer's newline, no stop
    with pytest.raises(ValueError, match="unknown needle protocol 'ruler'; choose strata or paper"):
        needle_grid(Uniform(259), tokenizer, filler, [960], [0.5], protocol="ruler")


# ---------------------------------------------------------------------------------------------
# Real models, tables, heat maps


def test_tiny_models_run_the_grid_with_caches(filler, tmp_path):
    """Plumbing with random weights through the caches, lengths past the training length (256 for
    the Transformer) included: every cell is answered within the answer budget."""
    tokenizer = ByteTokenizer()
    for preset, lengths, depths in (("transformer", [200, 300], [0.0, 1.0]), ("aunet2", [200], [0.5])):
        model = build_model(load_config(TINY / f"{preset}.yaml", ["model.init_std=0.1"])).eval()
        result = needle_grid(model, tokenizer, filler, lengths, depths, trials=1, name=preset)
        assert result["training_length"] == model.config.context_length and result["model"] == preset
        outputs = [trial["output"] for cell in result["cells"] for trial in cell["trials"]]
        assert len(outputs) == len(lengths) * len(depths) and all(len(output) <= 9 + 1 for output in outputs)
    path = plot_heatmap(result, tmp_path / "needle.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_and_heatmap(tmp_path):
    import matplotlib.image

    result = {"task": "needle", "protocol": "strata", "model": "tiny", "tokenizer": "bytes", "training_length": 256,
              "lengths": [128, 256, 512], "depths": [0.0, 0.5, 1.0], "trials": 4, "seed": 0,
              "accuracy": [[1.0, 0.75, 0.0], [1.0, 0.5, 0.0], [1.0, 1.0, 0.25]], "mean": 0.6111, "cells": []}
    table = needle_markdown(result)
    assert "| depth \\ length | 128 | 256 | 512 |" in table
    assert "| 50% | 100% | 50% | 0% |" in table and "| **mean** | 100% | 75% | 8% |" in table
    assert table.startswith("Needle in a haystack of tiny: 61.1% over all cells; 4 trials a cell")
    path = plot_heatmap(result, tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
