"""Multiple-choice evaluation: which choice does the model find most likely after the prompt?

A task file is JSONL, one item a line: ``{"input": str, "choices": [str, ...], "gold": int}``.

Prompt format (k shots, drawn per item from the *other* items of the same file with a fixed seed)::

    <shot 1 input> <shot 1 gold choice>\\n\\n ... <shot k input> <shot k gold choice>\\n\\n<input>

and the continuation scored for choice ``c`` is ``" " + c``. The prompt is ``[BOS] + encode(prompt)``
and each continuation is encoded on its own, so every choice follows the same prompt tokens.

For each choice, the log-likelihood is the sum of log p(token) over its continuation tokens.
``acc``: the choice with the highest log-likelihood is gold. The normalised accuracies divide each
log-likelihood by the length of the choice, so long choices are not penalised for having more tokens:

- ``acc_norm``: by its length in characters (code points), lm-evaluation-harness's ``acc_norm``. The
  harness divides by ``len(choice)``, the choice as the task lists it, without the delimiter
  (``" "``) put before it to score it; a task written for it with ``doc_to_choice: choices`` and the
  default ``target_delimiter`` scores what strata scores and gets the same ``acc_norm``.
- ``acc_bytes``: by its length in UTF-8 bytes, again without the space: the hybrid paper's
  normalisation ("Hybrid Architectures for Language Models", Bae et al., 2025, its evaluation
  protocol), and the harness's ``acc_bytes``. The two differ on non-ASCII choices
  (``"é"`` is one character, two bytes).

Ties go to the first choice (``argmax`` order). With a byte model of constant logits every byte
costs the same, so ``acc`` picks the shortest choice in bytes, ``acc_bytes`` the longest (the scored
space costs a byte that the length leaves out), and ``acc_norm`` the longest when all are ASCII.

The cached path runs every distinct prefix of the items' (prompt, choice) sequences once, through a
prefix tree of them all and forks of the inference caches (``strata.evals.prefix_tree``): an item's
choices share its prompt, and items share their first sentences. ``use_cache=False`` is the
reference, one full forward per (prompt, choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from strata.data.catalog import resolve
from strata.data.errors import DataError
from strata.data.jsonl import json_objects
from strata.data.levels import model_inputs
from strata.evals.prefix_tree import score_continuations


@dataclass
class Item:
    input: str
    choices: list[str]
    gold: int


def load_task(path: str | Path) -> list[Item]:
    """The items of a JSONL task file or named task (``strata data list``); a bad file raises a
    one-line DataError naming file and line."""
    path = resolve(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"{path}: cannot read the task file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: the task file is not UTF-8") from None
    items = []
    for where, record in json_objects(path, text):
        missing = [key for key in ("input", "choices", "gold") if key not in record]
        if missing:
            raise DataError(f"{where}: missing key {', '.join(missing)}")
        text, choices, gold = record["input"], record["choices"], record["gold"]
        if not isinstance(text, str):
            raise DataError(f"{where}: input must be a string")
        if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
            raise DataError(f"{where}: choices must be a list of strings")
        if not choices:
            raise DataError(f"{where}: choices is empty")
        if "" in choices:  # its length would divide its log-likelihood
            raise DataError(f"{where}: choice {choices.index('')} is an empty string")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: gold {gold!r} is not an index into the {len(choices)} choices")
        items.append(Item(text, choices, gold))
    if not items:
        raise DataError(f"{path}: no items in the task file")
    return items


def build_prompts(items: list[Item], shots: int = 0, seed: int = 0) -> list[str]:
    """Each item's prompt with ``shots`` examples from the other items (see the module docstring).

    Item i's shots depend only on (seed, i), so a prompt is the same whichever items are scored.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots > len(items) - 1:
        raise ValueError(f"{shots} shots need at least {shots + 1} items, the task has {len(items)}")
    prompts = []
    for index, item in enumerate(items):
        rng = np.random.default_rng([seed, index])
        others = rng.choice(len(items) - 1, size=shots, replace=False)
        others = others + (others >= index)  # skip the item itself
        examples = [f"{items[other].input} {items[other].choices[items[other].gold]}" for other in others]
        prompts.append("\n\n".join([*examples, item.input]))
    return prompts


def score_choices(model, tokenizer, prompts: list[str], items: list[Item], *, use_cache: bool = True,
                  max_rows: int = 64) -> list[list[float]]:
    """Log-likelihood of each choice's continuation given its item's prompt.

    The cached path scores all items through one prefix tree (``strata.evals.prefix_tree``),
    ``max_rows`` rows a forward. Runs under ``torch.inference_mode`` with ``model.eval()``,
    restoring the training mode afterwards.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(prompt.encode()).tolist()] for prompt in prompts]
    choice_ids = [[tokenizer.encode(_continuation(choice)).tolist() for choice in item.choices] for item in items]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if not use_cache:
                return [[_full_forward(model, prompt, choice, device) for choice in choices]
                        for prompt, choices in zip(prompt_ids, choice_ids, strict=True)]
            scores = score_continuations(model, prompt_ids, choice_ids, tokenizer.pad_id, device, max_rows=max_rows)
            return [[log_likelihood for log_likelihood, _ in item_scores] for item_scores in scores]
    finally:
        model.train(was_training)


def evaluate_task(model, tokenizer, path: str | Path, *, shots: int = 0, seed: int = 0, limit: int | None = None,
                  use_cache: bool = True, return_items: bool = False) -> dict:
    """``acc``, ``acc_norm``, ``acc_bytes`` (module docstring), their binomial standard errors and
    ``n`` on a task file; with ``return_items`` also ``items``: per item the choices'
    log-likelihoods, gold and predictions (``pred``, ``pred_norm``, ``pred_bytes``).

    ``limit`` scores the first items only; shots are still drawn from the whole file.
    """
    items = load_task(path)
    prompts = build_prompts(items, shots, seed)
    if limit is not None:
        items, prompts = items[:limit], prompts[:limit]
    scores = score_choices(model, tokenizer, prompts, items, use_cache=use_cache)
    per_item = []
    for item, loglikelihoods in zip(items, scores, strict=True):
        lls = np.array(loglikelihoods)
        characters = np.array([len(choice) for choice in item.choices])
        utf8_bytes = np.array([len(choice.encode()) for choice in item.choices])
        # np.argmax returns the first maximum: ties go to the first choice.
        per_item.append({"loglikelihoods": loglikelihoods, "gold": item.gold, "pred": int(np.argmax(lls)),
                         "pred_norm": int(np.argmax(lls / characters)), "pred_bytes": int(np.argmax(lls / utf8_bytes))})
    n = len(per_item)
    result: dict = {"n": n}
    for metric, pred in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_bytes", "pred_bytes")):
        result[metric] = sum(entry[pred] == entry["gold"] for entry in per_item) / n
        result[f"{metric}_stderr"] = _stderr(result[metric], n)
    if return_items:
        result["items"] = per_item
    return result


def _continuation(choice: str) -> bytes:
    return (" " + choice).encode()


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def _log_likelihood(logits: torch.Tensor, targets: list[int]) -> float:
    """Sum of log p(target) where logits [T, V] row t predicts targets[t].

    Summed in float64: n equal terms then sum to exactly n times the term, so choices a model
    finds equally likely per byte tie exactly and the tie rule (first choice) decides.
    """
    log_probs = logits.float().log_softmax(-1)
    return log_probs[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)].double().sum().item()


def _full_forward(model, prompt: list[int], choice: list[int], device) -> float:
    tokens = torch.tensor([prompt + choice], device=device)
    logits = model(tokens, **model_inputs(model, tokens))[0, len(prompt) - 1 : -1].cpu()  # the positions that predict the choice
    return _log_likelihood(logits, choice)
