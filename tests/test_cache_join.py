"""Caches for a batch that changes while it decodes (``strata serve``): rows joined from caches
filled apart, and prefixes restored from snapshots, held to the full forward and the cold run."""

import pytest
import torch

from strata.inference import model_cache
from strata.inference.aunet_cache import AUNetCache
from strata.inference.cache import StackCache
from test_generate import prompts, tiny

FAMILIES = ["transformer", "swa", "mamba2", "inter", "intra", "gdn", "kda", "aunet2"]


def join(model, caches):
    return (AUNetCache if isinstance(caches[0], AUNetCache) else StackCache).join(caches, room=4)


def prefilled(model, ids):
    cache = model_cache(model, 1, 8)
    return cache, model(torch.tensor([ids]), cache, last_only=True)[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_joined_while_decoding_equal_each_sequence_alone(family):
    """Sequences prefilled alone join a decoding batch: one longer than the batch (the batch gains
    left padding; for sliding windows the ring turns), one after a row has left (padding every row
    shares is dropped). Every step's logits equal the full forward of each sequence."""
    model = tiny(family)
    sequences = prompts([5, 40, 90, 33], seed=3)
    joins = {0: [0, 1], 3: [2], 8: [3]}
    cache, logits, rows = None, None, []
    with torch.no_grad():
        for step in range(12):
            if step in joins:
                parts = [prefilled(model, sequences[i]) for i in joins[step]]
                caches = ([cache] if cache is not None else []) + [part[0] for part in parts]
                cache = join(model, caches)
                logits = torch.cat(([logits] if logits is not None else []) + [part[1] for part in parts])
                rows += joins[step]
            if step == 6:  # the first row leaves
                cache.select(torch.arange(1, len(rows)))
                logits, rows = logits[1:], rows[1:]
            tokens = logits.argmax(-1)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                sequences[row].append(token)
            logits = model(tokens[:, None], cache)[:, -1]
            for index, row in enumerate(rows):
                full = model(torch.tensor([sequences[row]]))[0, -1]
                torch.testing.assert_close(logits[index], full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_restored_from_snapshots_gives_the_cold_logits_exactly(family):
    """Prefilled in blocks with a snapshot at each block's end, then restored from the first three
    snapshots and prefilled on in the same blocks: bit for bit the cold run, twice over (a restore
    leaves the snapshots intact)."""
    model = tiny(family)
    block, ids = 16, torch.tensor(prompts([75], seed=4))
    with torch.no_grad():
        cold, snapshots = model_cache(model, 1, 8), []
        for start in range(0, ids.shape[1], block):
            expected = model(ids[:, start : start + block], cold, last_only=True)
            if cold.length % block == 0:
                snapshots.append(cold.snapshot(start))
        expected_next = model(expected[:, -1].argmax(-1)[:, None], cold)
        for _ in range(2):
            warm = model_cache(model, 1, 8)
            warm.load(snapshots[:3])
            assert warm.length == 3 * block
            for start in range(3 * block, ids.shape[1], block):
                logits = model(ids[:, start : start + block], warm, last_only=True)
            assert torch.equal(logits, expected)
            assert torch.equal(model(logits[:, -1].argmax(-1)[:, None], warm), expected_next)
