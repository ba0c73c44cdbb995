"""Forks that end rows early and go on (trailing padding in the caches), and the prefix-tree scorer
built on them: every family scores as one full forward per sequence does, and each distinct
prefix runs once."""

from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from strata import build_model, load_config
from strata.data.levels import model_inputs
from strata.evals import prefix_tree
from strata.evals.prefix_tree import score_continuations
from strata.inference import model_cache

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
# Families whose caches hold trailing padding; sliding windows (swa, AU-Net) refuse it.
RAGGED = ["transformer", "mamba2", "inter", "intra", "intra-moe", "gdn", "inter-gdn"]
PAD = 258


@cache
def tiny(family: str):
    torch.manual_seed(0)
    return build_model(load_config(TINY / f"{family}.yaml", ["model.init_std=0.1"])).eval()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    batch = torch.tensor([tokens])
    return model(batch, **model_inputs(model, batch))[0]


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    batch = torch.full((len(rows), width), PAD)
    for row, tokens in enumerate(rows):
        batch[row, : len(tokens)] = torch.tensor(tokens)
    return batch, torch.tensor([len(tokens) for tokens in rows])


@pytest.mark.parametrize("family", RAGGED)
@torch.inference_mode()
def test_rows_ended_early_continue_as_if_alone(family):
    """A prefix across the SSD chunk (32), forked to three rows that run continuations of different
    lengths twice over (trailing padding each time), then one decoding step: every real position's
    logits equal the full forward of that row's own sequence."""
    model = tiny(family)
    prefix = random_tokens(40, 0)
    first = [random_tokens(n, 1 + n) for n in (5, 17, 33)]
    second = [random_tokens(n, 50 + n) for n in (9, 1, 4)]
    last = [[7], [8], [9]]
    cache_ = model_cache(model, 1, 0)
    model(torch.tensor([prefix]), cache_)
    fork = cache_.fork(torch.tensor([0, 0, 0]), room=8)
    outputs = []
    for part in (first, second):
        tokens, lengths = right_padded(part)
        outputs.append(model(tokens, fork, lengths=lengths))
    outputs.append(model(torch.tensor(last), fork))
    for row in range(3):
        reference = full_logits(model, prefix + first[row] + second[row] + last[row])
        at = len(prefix)
        for part, logits in zip((first, second, last), outputs, strict=True):
            n = len(part[row])
            torch.testing.assert_close(logits[row, :n], reference[at : at + n], atol=1e-4, rtol=0)
            at += n
    assert fork.length == 40 + 33 + 9 + 1 and cache_.length == 40  # the forked-from cache is untouched


@pytest.mark.parametrize("family", ["swa", "aunet2"])
@torch.inference_mode()
def test_sliding_windows_refuse_trailing_padding(family):
    model = tiny(family)
    cache_ = model_cache(model, 2, 16)
    assert not cache_.holds_trailing_padding
    with pytest.raises(ValueError, match="trailing padding"):
        model(torch.zeros(2, 4, dtype=torch.long), cache_, lengths=torch.tensor([4, 2]))


def sequences_with_shared_prefixes():
    """Prompts that share first parts, continuations that are prefixes of each other, repeated,
    one token long, and empty."""
    base, other = random_tokens(30, 3), random_tokens(12, 4)
    prompts = [
        [257, *base, 1, 2, 3],
        [257, *base, 1, 2, 3],  # the same prompt twice
        [257, *base, *other],
        [257, *other],
        [257],  # BOS alone
    ]
    continuations = [
        [[10, 11, 12], [10, 11], [10, 11, 12, 13, *random_tokens(40, 5)]],
        [[10, 11, 12], [99]],
        [[5], [6], [5, 6, 7]],
        [random_tokens(25, 6), random_tokens(3, 7), []],
        [[65, 66], [65]],
    ]
    return prompts, continuations


def reference_scores(model, prompts, continuations):
    scores = []
    for prompt, group in zip(prompts, continuations, strict=True):
        group_scores = []
        for continuation in group:
            if not continuation:
                group_scores.append((0.0, True))
                continue
            log_probs = full_logits(model, prompt + continuation)[len(prompt) - 1 : -1].log_softmax(-1)
            target = torch.tensor(continuation)
            group_scores.append((log_probs[torch.arange(len(target)), target].double().sum().item(),
                                 bool((log_probs.argmax(-1) == target).all())))
        scores.append(group_scores)
    return scores


@pytest.mark.parametrize("family", [*RAGGED, "swa", "aunet2"])
@pytest.mark.parametrize("max_rows", [2, 64])
@torch.inference_mode()
def test_prefix_tree_scores_equal_one_full_forward_per_sequence(family, max_rows):
    model = tiny(family)
    prompts, continuations = sequences_with_shared_prefixes()
    tree = score_continuations(model, prompts, continuations, PAD, "cpu", max_rows=max_rows)
    reference = reference_scores(model, prompts, continuations)
    for tree_group, reference_group in zip(tree, reference, strict=True):
        for (log_likelihood, greedy), (expected, expected_greedy) in zip(tree_group, reference_group, strict=True):
            assert log_likelihood == pytest.approx(expected, abs=1e-4)
            assert greedy == expected_greedy


class CountingModel(nn.Module):
    """Counts the real tokens each forward runs (padding is PAD, which no sequence holds)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.tokens = model, 0

    def forward(self, tokens, cache=None, **kwargs):
        self.tokens += int((tokens != PAD).sum())
        return self.model(tokens, cache, **kwargs)


@torch.inference_mode()
def test_each_distinct_prefix_runs_once(monkeypatch):
    """With no short edges merged, the tokens run are the tree's: every distinct prefix of the
    sequences once, less the last token of each sequence that no other continues."""
    monkeypatch.setattr(prefix_tree, "SHORT_EDGE", 0)
    counting = CountingModel(tiny("transformer"))
    prompts, continuations = sequences_with_shared_prefixes()
    sequences = {tuple(prompt + continuation) for prompt, group in zip(prompts, continuations, strict=True)
                 for continuation in group}
    prefixes = {sequence[:end] for sequence in sequences for end in range(1, len(sequence) + 1)}
    unextended = [s for s in sequences if not any(len(other) > len(s) and other[: len(s)] == s for other in sequences)]
    # The scorer builds its cache from the model it is given: here, from the wrapped one.
    monkeypatch.setattr(prefix_tree, "model_cache", lambda model, *args: model_cache(counting.model, *args))
    score_continuations(counting, prompts, continuations, PAD, "cpu")
    assert counting.tokens == len(prefixes) - len(unextended)
