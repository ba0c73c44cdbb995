"""Multiple-choice evaluation: cached scoring equals one full forward per choice, oracle and uniform
models score what they must, k-shot prompts, bad task files, and ``strata eval --tasks``."""

import json
import math
from functools import cache
from pathlib import Path

import pytest
import torch
from cli_runner import strata, train_tiny
from torch import nn

from strata import build_model, load_config
from strata.data import ByteTokenizer
from strata.data.errors import DataError
from strata.evals.multiple_choice import (
    build_prompts,
    evaluate_task,
    load_task,
    score_choices,
)
from strata.train.runs import open_run

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 20


@cache
def tiny(family: str):
    torch.manual_seed(0)
    return build_model(load_config(ROOT / f"configs/tiny/{family}.yaml", ["model.init_std=0.1"]))


class Uniform(nn.Module):
    """Constant logits: every token equally likely."""

    def __init__(self, vocab_size: int = 259):
        super().__init__()
        self.vocab_size = vocab_size
        self.unused = nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab_size)


class Oracle(Uniform):
    """Puts high probability on the next token of the gold continuation of whichever prompt the
    sequence starts with; uniform anywhere else."""

    def __init__(self, prompts: list[str], items, tokenizer):
        super().__init__(tokenizer.vocab_size)
        self.gold = {}  # prompt token ids -> prompt + gold continuation token ids
        for prompt, item in zip(prompts, items, strict=True):
            prompt_ids = (tokenizer.bos_id, *tokenizer.encode(prompt.encode()).tolist())
            gold = tokenizer.encode((" " + item.choices[item.gold]).encode()).tolist()
            self.gold[prompt_ids] = prompt_ids + tuple(gold)

    def forward(self, tokens):
        logits = super().forward(tokens)
        for row, ids in enumerate(tokens.tolist()):
            gold = next(self.gold[tuple(ids[:end])] for end in range(len(ids) + 1) if tuple(ids[:end]) in self.gold)
            for position in range(len(ids)):
                if position + 1 < len(gold) and ids[: position + 1] == list(gold[: position + 1]):
                    logits[row, position, gold[position + 1]] = 20.0
        return logits


@pytest.fixture(scope="module")
def word_order(tasks_dir) -> Path:
    """Two choices a line, the same words with two swapped: they share a long prefix."""
    return tasks_dir / "sotu-word-order.jsonl"


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("family", ["intra", "transformer", "swa"])
def test_cached_scores_equal_one_full_forward_per_choice(family, shots, word_order):
    items = load_task(word_order)
    prompts = build_prompts(items, shots)[:ITEMS]
    model, tokenizer = tiny(family), ByteTokenizer()
    model.train()
    # One prefix tree of all items: forks, rows ended early and rows that go on, all at once.
    cached = score_choices(model, tokenizer, prompts, items[:ITEMS])
    reference = score_choices(model, tokenizer, prompts, items[:ITEMS], use_cache=False)
    assert model.training  # the mode is restored
    for fast, slow in zip(cached, reference, strict=True):
        assert fast == pytest.approx(slow, abs=1e-4)


def test_an_oracle_scores_every_item(tasks_dir):
    path = tasks_dir / "udhr-language.jsonl"
    items, tokenizer = load_task(path)[:ITEMS], ByteTokenizer()
    oracle = Oracle(build_prompts(load_task(path), 1)[:ITEMS], items, tokenizer)
    result = evaluate_task(oracle, tokenizer, path, shots=1, limit=ITEMS, use_cache=False)
    assert result == {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0, "n": ITEMS, "acc_stderr": 0.0,
                      "acc_norm_stderr": 0.0, "acc_bytes_stderr": 0.0}


@pytest.mark.parametrize("task", ["sotu-word-order", "udhr-language"])
def test_a_uniform_model_scores_the_tie_breaking_rule(task, tasks_dir):
    """With constant logits every byte costs log(vocab), the scored space included: ``acc`` picks
    the (first) shortest choice, and ``acc_norm`` and ``acc_bytes`` (these choices are ASCII, so
    characters are bytes) the (first) longest, as the n + 1 bytes scored over the n divided by fall
    with n. What that scores is fixed by the file, not by the model. The two choices of
    sotu-word-order always tie (same bytes), so every rule picks the first; udhr-language's four
    language names differ in length."""
    path = tasks_dir / f"{task}.jsonl"
    items = load_task(path)
    result = evaluate_task(Uniform(), ByteTokenizer(), path, use_cache=False, return_items=True)
    shortest = [min(range(len(item.choices)), key=lambda c: len(item.choices[c])) for item in items]
    longest = [max(range(len(item.choices)), key=lambda c: len(item.choices[c])) for item in items]
    expected_acc = sum(item.gold == pick for item, pick in zip(items, shortest, strict=True)) / len(items)
    expected_norm = sum(item.gold == pick for item, pick in zip(items, longest, strict=True)) / len(items)
    assert result["acc"] == pytest.approx(expected_acc)
    assert result["acc_norm"] == result["acc_bytes"] == pytest.approx(expected_norm)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(expected_acc * (1 - expected_acc) / len(items)))
    assert [entry["pred_norm"] for entry in result["items"]] == longest


def test_shots_are_other_items_and_reproducible(word_order):
    items = load_task(word_order)[:50]
    prompts = build_prompts(items, 3, seed=7)
    assert prompts == build_prompts(items, 3, seed=7)
    assert prompts != build_prompts(items, 3, seed=8)
    examples = {f"{item.input} {item.choices[item.gold]}" for item in items}
    for index, (item, prompt) in enumerate(zip(items, prompts, strict=True)):
        *shots, last = prompt.split("\n\n")
        assert last == item.input and len(shots) == 3 and set(shots) <= examples
        assert f"{item.input} {item.choices[item.gold]}" not in shots
        assert all(shot != f"{items[index].input} {choice}" for shot in shots for choice in item.choices)
    assert build_prompts(items, 0) == [item.input for item in items]
    with pytest.raises(ValueError, match="50 shots need at least 51 items"):
        build_prompts(items, 50)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"input": "a", "choices": ["x"], "gold": 0}\n{"input": "a", "choices": ["x"]\n', ":2: not valid JSON"),
        ('{"input": "a", "choices": ["x"]}\n', ":1: missing key gold"),
        ('["a", ["x"], 0]\n', ":1: expected a JSON object, found list"),
        ('\n{"input": "a", "choices": ["x", "y"], "gold": 2}\n', ":2: gold 2 is not an index into the 2 choices"),
        ('{"input": "a", "choices": [], "gold": 0}\n', ":1: choices is empty"),
        ('{"input": "a", "choices": "xy", "gold": 0}\n', ":1: choices must be a list of strings"),
        ('{"input": "a", "choices": ["x", ""], "gold": 0}\n', ":1: choice 1 is an empty string"),
        ("", ": no items in the task file"),
    ],
)
def test_bad_task_files_fail_with_one_line_naming_file_and_line(content, message, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_task(path)
    assert str(error.value).startswith(f"{path}{message}")
    assert "\n" not in str(error.value)


def test_a_missing_task_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder$"):
        load_task(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_tiny("transformer", tmp_path_factory.mktemp("multiple_choice") / "run")


def test_eval_tasks_prints_the_library_result(run, word_order):
    printed = json.loads(strata("eval", run, "--tasks", word_order, "--shots", 1, "--limit", 40, "--json").stdout)
    trained = open_run(run)
    expected = evaluate_task(trained.model, trained.tokenizer, word_order, shots=1, limit=40)
    assert printed["sotu-word-order"] == expected and printed["sotu-word-order"]["n"] == 40
    assert printed["checkpoint"] == str(trained.checkpoint) and "bpb" not in printed


def test_eval_with_data_and_tasks_keeps_the_bpb_keys_and_prints_tables(run, tmp_path):
    """Tasks by name (``strata data list``), built into the cache on first use."""
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    both = json.loads(strata("eval", run, "--data", text, "--tasks", "sotu-word-order", "--limit", 5, "--json").stdout)
    assert {"bpb", "bytes", "files", "checkpoint", "sotu-word-order"} <= set(both)
    table = strata("eval", run, "--tasks", "sotu-word-order", "--limit", 5).stdout.decode()
    assert "sotu-word-order" in table and "acc_norm" in table and "acc_bytes" in table and "±" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give something to evaluate: --data PATH (bits per byte), --tasks TASK (multiple choice)"),
        (["--tasks", "/nonexistent/task.jsonl"], "/nonexistent/task.jsonl: no such file or folder"),
        (["--tasks", "/nonexistent/task.jsonl", "--protocol", "paper"], "protocol paper changes needle and long"),
        (["--needle", "/nonexistent/filler.txt", "--max-length", "2000"],
         "max-length caps the paper's needle lengths: give it with protocol paper and without lengths"),
    ],
)
def test_bad_eval_arguments_fail_with_one_clear_line(run, args, message):
    result = strata("eval", run, *args, check=False)
    assert result.returncode == 2 and result.stdout == b""
    assert message in result.stderr.decode().strip().splitlines()[-1]
    assert b"Traceback" not in result.stderr
