"""Generation: cached decoding equals recomputing the full sequence, for every mixer; batching,
sampling, stopping and prompt handling."""

from functools import cache
from pathlib import Path

import pytest
import torch

import strata
from strata import build_model, load_config
from strata.cost.model import model_cost
from strata.data import ByteTokenizer
from strata.inference.cache import StackCache
from strata.inference.generate import generate
from strata.inference.sampling import choose_tokens, filter_logits, penalize_repetition
from strata.inference.stop import StopStrings

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
FAMILIES = ["transformer", "swa", "mamba2", "inter", "intra", "intra-moe", "gdn", "inter-gdn", "kda"]
# Around the SSD chunk (32) and the sliding window (64 + 8 sinks), plus a one-token prompt.
PROMPT_LENGTHS = [1, 31, 32, 33, 63, 65, 72, 73]
NEW = 24
LOGITS_TOL = 1e-4


@cache
def tiny(family: str, *overrides: str):
    # A larger init spreads the logits, so greedy paths are varied rather than one repeated byte.
    torch.manual_seed(0)
    return build_model(load_config(TINY / f"{family}.yaml", ["model.init_std=0.1", *overrides])).eval()


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def assert_same(fast, slow):
    for a, b in zip(fast, slow, strict=True):
        assert a.tokens == b.tokens
        assert a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.logits, b.logits, atol=LOGITS_TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_batch_equals_full_recompute_of_each_prompt(family):
    """The left-padded batch, through the caches, against the full forward of each prompt alone."""
    model = tiny(family)
    cached = generate(model, prompts(), NEW, return_logits=True)
    reference = generate(model, prompts(), NEW, return_logits=True, use_cache=False)
    assert_same(cached, reference)
    assert len({tuple(g.tokens) for g in cached}) > 1 and all(len(set(g.tokens)) > 2 for g in cached)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_generating_each_alone(family):
    model = tiny(family)
    batched = generate(model, prompts(), NEW, return_logits=True)
    alone = [generate(model, prompt, NEW, return_logits=True)[0] for prompt in prompts()]
    assert_same(batched, alone)


@pytest.mark.parametrize("family", ["swa", "inter", "intra"])
@pytest.mark.parametrize("chunk", [5, 16, 40])
def test_chunked_prefill_equals_one_pass(family, chunk):
    """Chunks shorter than the SSD chunk, than the window, and longer than the window."""
    model = tiny(family)
    whole = generate(model, prompts(), 8, return_logits=True)
    chunked = generate(model, prompts(), 8, return_logits=True, prefill_chunk=chunk)
    assert_same(chunked, whole)


def test_cache_steps_match_the_full_forward_at_every_position():
    """Prefill then single steps through StackCache directly, logits at every position."""
    model = tiny("intra")
    tokens = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens)
        cache = StackCache(model.blocks, batch_size=2, capacity=16)  # grows past its capacity
        steps = [model(tokens[:, :50], cache)] + [model(tokens[:, t : t + 1], cache) for t in range(50, 90)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=LOGITS_TOL, rtol=0)
    assert cache.length == 90


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_memory_matches_the_cost_model(family):
    model = tiny(family)
    context, batch = 300, 3
    cache = StackCache(model.blocks, batch_size=batch, capacity=context)
    expected = batch * model_cost(model.config, context, "fp32").cache_bytes
    assert abs(cache.nbytes - expected) <= 0.05 * expected
    if family in ("inter", "intra", "mamba2", "transformer", "gdn", "inter-gdn", "kda"):
        assert cache.nbytes == expected


def test_mamba_cache_does_not_grow_with_context():
    model = tiny("mamba2")
    with torch.inference_mode():
        cache = StackCache(model.blocks, batch_size=1, capacity=1)
        model(torch.randint(0, 256, (1, 10)), cache)
        size = cache.nbytes
        model(torch.randint(0, 256, (1, 1000)), cache)
        for _ in range(5):
            model(torch.randint(0, 256, (1, 1)), cache)
    assert cache.nbytes == size and cache.length == 1015


def test_window_cache_stops_growing_at_window_plus_sinks():
    model = tiny("swa")
    with torch.inference_mode():
        cache = StackCache(model.blocks, batch_size=1, capacity=1)
        model(torch.randint(0, 256, (1, 500)), cache)
    window_layers = [layer for layer in cache.layers if type(layer).__name__ == "WindowCache"]
    assert window_layers and all(layer.keys.shape[2] == 64 + 8 for layer in window_layers)


def test_finished_sequences_leave_the_batch():
    model = tiny("inter")
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        free = generate(model, prompts([5, 9, 14]), 12)
        # Stop the second prompt at its fourth token: the other two must run on unchanged.
        stop = free[1].tokens[3]
        stopped = generate(model, prompts([5, 9, 14]), 12, stop_tokens=[stop])
    finally:
        hook.remove()
    assert stopped[1].finish_reason == "eos" and stopped[1].tokens == free[1].tokens[:3]
    for index in (0, 2):
        cut = free[index].tokens.index(stop) if stop in free[index].tokens else 12
        assert stopped[index].tokens == free[index].tokens[:cut]
    assert 3 in batch_sizes and min(batch_sizes) < 3  # the batch shrank once a sequence finished


# --- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny("transformer")
    run = lambda seed: generate(model, prompts([10, 20]), 30, temperature=1.0, seed=seed)  # noqa: E731
    assert [g.tokens for g in run(1)] == [g.tokens for g in run(1)]
    assert [g.tokens for g in run(1)] != [g.tokens for g in run(2)]


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny("mamba2")
    greedy = [g.tokens for g in generate(model, prompts([7, 12]), 20)]
    assert [g.tokens for g in generate(model, prompts([7, 12]), 20, temperature=1.5, top_k=1, seed=3)] == greedy
    assert [g.tokens for g in generate(model, prompts([7, 12]), 20, temperature=1.5, top_p=1e-6, seed=3)] == greedy


def test_filter_logits_keeps_top_k_and_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert penalize_repetition(logits, seen, 1.0) is logits


def test_repetition_penalty_reduces_repeats():
    model = tiny("transformer")
    plain = generate(model, prompts([8]), 60)[0].tokens
    penalized = generate(model, prompts([8]), 60, repetition_penalty=3.0)[0].tokens
    assert len(set(penalized)) > len(set(plain))


def test_choose_tokens_greedy_and_sampled_shapes():
    logits = torch.randn(3, 11)
    assert choose_tokens(logits).tolist() == logits.argmax(-1).tolist()
    assert choose_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0)).shape == (3,)


# --- stopping and text ------------------------------------------------------------------------


def test_stop_strings_hold_back_possible_beginnings():
    stops = StopStrings([b"END", b"\n\n"])
    assert stops.feed(b"abE") == (b"ab", False)  # "E" may begin END
    assert stops.feed(b"N") == (b"", False)
    assert stops.feed(b"x") == (b"ENx", False)  # it did not
    assert stops.feed(b"y\n") == (b"y", False)
    assert stops.feed(b"\nmore") == (b"", True)
    assert StopStrings([b"stop"]).feed(b"nonstop!") == (b"non", True)
    assert StopStrings([b"abc"]).flush() == b""
    with pytest.raises(ValueError, match="empty"):
        StopStrings([b""])


def test_stop_string_ends_generation_before_it():
    model, tokenizer = tiny("transformer"), ByteTokenizer()
    free = generate(model, b"Hello", 40, tokenizer=tokenizer)[0]
    data = tokenizer.decode(free.tokens)
    stop = data[10:13]  # bytes, which need not be UTF-8
    streamed = []
    stopped = generate(model, b"Hello", 40, tokenizer=tokenizer, stop=stop, on_text=lambda i, new: streamed.append(new))[0]
    assert stopped.finish_reason == "stop"
    assert b"".join(streamed) == data[: data.index(stop)]
    assert stopped.text == data[: data.index(stop)].decode("utf-8", errors="replace")


def test_text_prompts_get_bos_and_streamed_bytes_equal_the_text():
    model, tokenizer = tiny("mamba2"), ByteTokenizer()
    tokens = []
    text = generate(model, "ROMEO:", 20, tokenizer=tokenizer, on_token=lambda i, t: tokens.append(t))[0]
    ids = generate(model, [tokenizer.bos_id, *b"ROMEO:"], 20, tokenizer=tokenizer)[0]
    assert text.tokens == ids.tokens == tokens
    assert text.text == tokenizer.decode(text.tokens).decode("utf-8", errors="replace")


@pytest.mark.parametrize("prompt", [b"\xff\xfe\x80 invalid", b"nul\x00\x00bytes", b"x" * 5000, b"", "caf\udce9"])
def test_arbitrary_bytes_generate_without_error(prompt):
    model, tokenizer = tiny("intra"), ByteTokenizer()
    generation = generate(model, prompt, 16, tokenizer=tokenizer, temperature=1.0, seed=0)[0]
    assert len(generation.tokens) <= 16 and isinstance(generation.text, str)


def test_eos_ends_a_sequence_and_is_not_returned():
    model, tokenizer = tiny("swa"), ByteTokenizer()
    free = generate(model, b"abc", 30, tokenizer=tokenizer)[0]
    stop = free.tokens[6]
    ended = generate(model, b"abc", 30, tokenizer=tokenizer, stop_tokens=[stop])[0]
    assert ended.finish_reason == "eos" and ended.tokens == free.tokens[: free.tokens.index(stop)]
    assert free.finish_reason == "length" and len(free.tokens) == 30


# --- the public API and bad input -------------------------------------------------------------


def test_strata_generate_is_the_public_entry_point():
    model = tiny("transformer")
    assert strata.generate is generate
    single = strata.generate(model, [1, 2, 3], max_new_tokens=5)
    assert len(single) == 1 and len(single[0].tokens) == 5 and single[0].text is None
    nothing = strata.generate(model, [[1, 2, 3]], max_new_tokens=0, return_logits=True)[0]
    assert nothing.tokens == [] and nothing.logits.shape == (0, model.config.vocab_size)


@pytest.mark.parametrize(
    ("prompts_", "kwargs", "message"),
    [
        ([], {}, "no prompts"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 999]], {}, "token id 999"),
        ("text", {}, "tokenizer"),
        ([[1.5, 2.0]], {}, "integer token ids"),
        ([[1, 2]], {"stop": "x"}, "stop strings need a tokenizer"),
        ([[1, 2]], {"temperature": -1}, "temperature"),
        ([[1, 2]], {"top_p": 0.0}, "top_p"),
        ([[1, 2]], {"top_k": 0}, "top_k"),
        ([[1, 2]], {"repetition_penalty": 0}, "repetition_penalty"),
        ([[1, 2]], {"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_arguments_name_the_problem(prompts_, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny("transformer"), prompts_, **{"max_new_tokens": 4, **kwargs})


def test_generating_mid_training_leaves_training_intact():
    """Generation runs in inference mode; the RoPE table it grows must still serve training."""
    model = build_model(load_config(TINY / "transformer.yaml"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 256, (2, 32))).sum().backward()
    optimizer.step()
    generate(model, [1, 2, 3], 1500)  # past the table's first 1024 positions
    assert model.training
    model(torch.randint(0, 256, (1, 1400))).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("family", ["transformer", "inter"])
def test_compiled_decoding_equals_eager(family):
    """``compile=True``: the same tokens and logits (1e-4) for a left-padded batch whose sequences
    finish at different steps, so the batch shrinks under the compiled step."""
    model = tiny(family)
    batch = prompts([5, 40, 33])
    stops = {"stop_tokens": [0, 1, 2, 3]}
    eager = generate(model, batch, NEW, return_logits=True, **stops)
    compiled = generate(model, batch, NEW, return_logits=True, compile=True, **stops)
    assert_same(compiled, eager)


def test_compiled_decoding_of_one_prompt_equals_eager():
    """A batch of one: on a CPU its projections compile to inductor's own reductions. The cache
    length is symbolic from the first compile, so the growing cache never recompiles."""
    model = tiny.__wrapped__("transformer")  # a fresh model: no other test compiled it
    eager = generate(model, prompts([37]), NEW, return_logits=True)
    torch._dynamo.utils.counters.clear()
    assert_same(generate(model, prompts([37]), NEW, return_logits=True, compile=True), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_refuses_what_it_cannot_compile():
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(tiny("transformer"), prompts([4]), 2, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="AU-Net"):
        generate(tiny("aunet2"), prompts([4]), 2, compile=True)
