"""AU-Net decoding through stage caches equals the full forward.

The byte stage runs every step; a deeper stage only when the new byte is a split at its depth.
Rows of one batch reach different depths on the same step. Texts are fed teacher-forced (so every
depth is reached on a known schedule) and generated greedily; both are compared with the full
forward of each row alone.
"""

from pathlib import Path

import pytest
import torch
from test_aunet import TEXT, aunet_config, build

from strata import build_model, load_config
from strata.data import ByteTokenizer
from strata.data.levels import model_inputs
from strata.evals.multiple_choice import evaluate_task
from strata.inference import model_cache
from strata.inference.generate import generate

TOLERANCE = 1e-4
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CONFIGS = {
    "aunet2": {"stages": 2},
    "aunet3": {"stages": 3},
    "aunet4": {"stages": 4},
    "aunet2-hybrid": {"stages": 2, "layouts": ("M", "MAM")},
    "aunet3-repeat": {"stages": 3, "upsample": "repeat"},
    "aunet3-simple": {"stages": 3, "upsample": "simple"},
    "learned2": {"stages": 2, "rule": "learned"},
    "learned3": {"stages": 3, "rule": "learned"},
}
TEXTS = [bytes(TEXT), TEXT[7:] + TEXT[:7], b"1 2 3, (four) five!\n\n six seven eight nine ten " * 3]


def full_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, **model_inputs(model, tokens))


def rows_of(prompt_lengths, steps):
    """Each row: BOS, then text; ``length`` ids of prompt and ``steps - 1`` fed one at a time."""
    return [[256, *text[: length + steps - 2]] for text, length in zip(TEXTS, prompt_lengths)]


@pytest.mark.parametrize("name", CONFIGS)
def test_teacher_forced_decoding_equals_the_full_forward(name):
    model = build(aunet_config(**CONFIGS[name]))
    lengths, steps = [1, 30, 57], 40
    rows = rows_of(lengths, steps)
    longest = max(lengths)
    starts = [longest - length for length in lengths]
    prompt = torch.zeros(len(rows), longest, dtype=torch.long)
    for row, (ids, start) in enumerate(zip(rows, starts)):
        prompt[row, start:] = torch.tensor(ids[: lengths[row]])
    cache = model_cache(model, len(rows), longest + steps, starts=starts)
    with torch.inference_mode():
        got = [model(prompt, cache)]
        for step in range(steps - 1):
            next_tokens = torch.tensor([[ids[length + step]] for ids, length in zip(rows, lengths)])
            got.append(model(next_tokens, cache))
    got = torch.cat(got, dim=1)
    for row, (ids, start) in enumerate(zip(rows, starts)):
        expected = full_logits(model, torch.tensor([ids]))[0]
        assert (got[row, start:] - expected).abs().max() < TOLERANCE, row


@pytest.mark.parametrize("preset", ["aunet2", "aunet3", "aunet2-hybrid", "hnet2"])
def test_greedy_generation_of_the_tiny_presets_with_caches_equals_recomputing(preset):
    # A wider init than the presets' 0.02 keeps greedy choices clear of near-ties.
    torch.manual_seed(1)
    model = build_model(load_config(TINY / f"{preset}.yaml", ["model.init_std=0.1"])).eval()
    assert_cached_and_chunked_generation_recompute(model, [TEXTS[0][:1], TEXTS[1][:33], TEXTS[2][:64]], 9)


def assert_cached_and_chunked_generation_recompute(model, prompts, prefill_chunk: int):
    """24 greedy bytes of each prompt through the caches, with the prompt prefilled whole and in
    pieces of ``prefill_chunk``, equal those of recomputing every step (logits within TOLERANCE)."""
    tokenizer = ByteTokenizer()
    cached = generate(model, prompts, 24, tokenizer=tokenizer, return_logits=True)
    chunked = generate(model, prompts, 24, tokenizer=tokenizer, return_logits=True, prefill_chunk=prefill_chunk)
    full = generate(model, prompts, 24, tokenizer=tokenizer, return_logits=True, use_cache=False)
    for a, b, c in zip(cached, chunked, full, strict=True):
        assert a.tokens == b.tokens == c.tokens
        assert (a.logits - c.logits).abs().max() < TOLERANCE and (b.logits - c.logits).abs().max() < TOLERANCE


@pytest.mark.parametrize("stages", [2, 3])
def test_the_trunk_runs_once_per_deepest_split(stages):
    model = build(aunet_config(stages))
    seen = []
    model.trunk[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    rows = rows_of([20, 45], 50)
    cache = model_cache(model, 2, 100, starts=[25, 0])
    prompt = torch.zeros(2, 45, dtype=torch.long)
    prompt[0, 25:], prompt[1] = torch.tensor(rows[0][:20]), torch.tensor(rows[1][:45])
    with torch.inference_mode():
        model(prompt, cache)
        for step in range(49):
            model(torch.tensor([[rows[0][20 + step]], [rows[1][45 + step]]]), cache)
    deepest = sum(int((model_inputs(model, torch.tensor([ids]))["levels"] == stages - 1).sum()) for ids in rows)
    assert sum(seen) == deepest
    assert len(seen) < 2 + 2 * 49  # steps that reach no deepest split run no trunk at all


def test_forked_rows_go_on_independently():
    model = build(aunet_config(3))
    ids = [256, *TEXTS[0][:40]]
    cache = model_cache(model, 1, 64)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache)
        cache.select(torch.tensor([0, 0, 0]))
        continuations = torch.tensor([list(b" cat "), list(b"dogs."), list(b"12 34")])
        got = model(continuations, cache)
    for row in range(3):
        expected = full_logits(model, torch.tensor([ids + continuations[row].tolist()]))[0, len(ids):]
        assert (got[row] - expected).abs().max() < TOLERANCE


def test_multiple_choice_scores_through_the_caches_equal_full_forwards(tasks_dir):
    """Four choices of different lengths: the context's cache is forked into four ragged rows."""
    model = build(aunet_config(2))
    path = tasks_dir / "sotu-next-sentence.jsonl"
    cached = evaluate_task(model, ByteTokenizer(), path, shots=1, limit=6)
    full = evaluate_task(model, ByteTokenizer(), path, shots=1, limit=6, use_cache=False)
    assert cached["acc"] == full["acc"] and cached["acc_norm"] == full["acc_norm"]
