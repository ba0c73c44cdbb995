"""Gated DeltaNet: the chunked gated delta rule equals the exact recurrence (outputs and gradients),
a ``G`` block equals transformers' Qwen3-Next Gated DeltaNet layer with copied weights, and its
cost is counted exactly. (Cached decoding, packed documents and carried state of the ``gdn`` and
``inter-gdn`` presets: tests/test_generate.py and tests/test_segments.py.)"""

import pytest
import torch
import torch.nn.functional as F

from strata.config import GatedDeltaNetConfig, validate_config
from strata.cost.model import gdn_sequence_flops, model_cost
from strata.models import build_model
from strata.nn.delta_rule import gated_delta_chunked, gated_delta_recurrent, gated_delta_step
from strata.nn.gated_deltanet import GatedDeltaNet


def rule_inputs(length, heads=3, key_width=16, value_width=24, max_beta=1.0, seed=0, log_decay=(0.0, 3.0),
                requires_grad=True, per_channel=False):
    """As the Gated DeltaNet mixer makes them: q, k L2-normalised (q scaled), β in (0, max_beta),
    log-decays g from -log_decay[0] down to -log_decay[1] a step (``per_channel``: one for each
    key channel, as Kimi Delta Attention's), and an initial state."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    q = F.normalize(rand(2, length, heads, key_width), dim=-1) * key_width**-0.5
    k = F.normalize(rand(2, length, heads, key_width), dim=-1)
    v = rand(2, length, heads, value_width)
    low, high = log_decay
    g = -(low + (high - low) * torch.rand(2, length, heads, *([key_width] if per_channel else []), generator=generator))
    beta = torch.rand(2, length, heads, generator=generator) * max_beta
    state = rand(2, heads, key_width, value_width)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta, state)]


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("length", [1, 50, 77, 129])
@pytest.mark.parametrize("max_beta", [1.0, 2.0], ids=["beta<1", "negative-eigenvalues"])
def test_chunked_rule_equals_the_recurrence_with_its_gradients(chunk, length, max_beta):
    """Outputs and final state within 1e-5, every input's gradient within 1e-4, for lengths that
    are not multiples of the chunk, from a given initial state."""
    q, k, v, g, beta, state = inputs = rule_inputs(length, max_beta=max_beta)
    chunked = gated_delta_chunked(q, k, v, g, beta, chunk, initial_state=state)
    reference = gated_delta_recurrent(q, k, v, g, beta, initial_state=state)
    for ours, theirs in zip(chunked, reference):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    probe = [torch.randn_like(x) for x in reference]
    grads = [torch.autograd.grad(sum((y * p).sum() for y, p in zip(result, probe)), inputs)
             for result in (chunked, reference)]
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [16, 64])
def test_resets_start_each_segment_from_a_zero_state(chunk):
    """A reset step sees none of the steps before it, in the chunked form as in the recurrence;
    and a segment's outputs are those of the segment run alone."""
    q, k, v, g, beta, _ = rule_inputs(90)
    resets = torch.zeros(2, 90, dtype=torch.bool)
    resets[:, [0, 20, 21, 64]] = True  # a one-step segment, and one starting on a chunk boundary
    chunked, _ = gated_delta_chunked(q, k, v, g, beta, chunk, resets=resets)
    reference, _ = gated_delta_recurrent(q, k, v, g, beta, resets=resets)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    alone, _ = gated_delta_recurrent(q[:, 21:64], k[:, 21:64], v[:, 21:64], g[:, 21:64], beta[:, 21:64])
    torch.testing.assert_close(chunked[:, 21:64], alone, atol=1e-5, rtol=0)
    (grad_g,) = torch.autograd.grad((chunked * torch.randn_like(chunked)).sum(), g)
    assert grad_g[:, [20, 21, 64]].abs().max() < 1e-12  # a reset step's own decay is never used (0 up to float64 rounding)


def test_a_step_in_place_equals_the_step_that_copies():
    """Decoding's in-place step writes into the given fp32 state the state the copying step
    returns (and the same output), and refuses a state it could not hold in fp32."""
    q, k, v, g, beta, state = rule_inputs(1, max_beta=2.0, requires_grad=False)
    step = [x[:, 0] for x in (q, k, v, g, beta)]
    o, new_state = gated_delta_step(state, *step)
    held = state.clone()
    o_in_place, returned = gated_delta_step(held, *step, in_place=True)
    torch.testing.assert_close(o_in_place, o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(held, new_state, atol=1e-6, rtol=1e-6)
    assert returned.data_ptr() == held.data_ptr()
    with pytest.raises(ValueError, match="fp32 state"):
        gated_delta_step(state.bfloat16(), *step, in_place=True)


def test_strong_decay_stays_finite_and_exact():
    """Decays of e^-40 a step underflow e^γ across a chunk; the chunked form must not produce inf/nan."""
    q, k, v, g, beta, state = rule_inputs(70)
    chunked, final = gated_delta_chunked(q, k, v, g.detach() * 13, beta, 64, initial_state=state)
    reference, reference_final = gated_delta_recurrent(q, k, v, g.detach() * 13, beta, initial_state=state)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(final, reference_final, atol=1e-5, rtol=0)


# --- against transformers' Qwen3-Next layer ---------------------------------------------------------


def qwen3_next_in_projection(layer) -> torch.Tensor:
    """HF's two in-projections, whose rows interleave per q/k head ([q, k, v…, z…] and [b…, a…]),
    as strata's one in-projection [q, k, v, z, b, a]."""
    heads, per_head = layer.num_k_heads, layer.num_v_heads // layer.num_k_heads
    qkvz = layer.in_proj_qkvz.weight.unflatten(0, (heads, -1))
    ba = layer.in_proj_ba.weight.unflatten(0, (heads, -1))
    widths = [layer.head_k_dim, layer.head_k_dim, per_head * layer.head_v_dim, per_head * layer.head_v_dim]
    parts = [*qkvz.split(widths, dim=1), *ba.split([per_head, per_head], dim=1)]
    return torch.cat([part.flatten(0, 1) for part in parts])


@pytest.mark.parametrize("value_heads_per_head", [1, 2])
def test_a_g_block_equals_transformers_qwen3_next_gated_deltanet(value_heads_per_head):
    pytest.importorskip("transformers")
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    hf_config = Qwen3NextConfig(hidden_size=48, linear_num_key_heads=2, linear_num_value_heads=2 * value_heads_per_head,
                                linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4,
                                num_hidden_layers=1, layer_types=["linear_attention"], rms_norm_eps=1e-6)
    torch.manual_seed(0)
    theirs = Qwen3NextGatedDeltaNet(hf_config, layer_idx=0).eval()
    with torch.no_grad():
        theirs.norm.weight.uniform_(0.5, 1.5)
        theirs.dt_bias.uniform_(-1, 1)
    config = GatedDeltaNetConfig(n_heads=2, n_v_heads=2 * value_heads_per_head, head_dim=16, v_head_dim=24,
                                 chunk_size=16)
    ours = GatedDeltaNet(48, config, norm_eps=1e-6).eval()
    with torch.no_grad():
        ours.in_proj.weight.copy_(qwen3_next_in_projection(theirs))
        for name in ("conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"):
            ours.get_parameter(name).copy_(theirs.get_parameter(name))
    x = torch.randn(2, 45, 48)  # not a multiple of the chunk (HF's is 64, ours 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)


# --- cost --------------------------------------------------------------------------------------------


def tiny_gdn_config(**gdn):
    return validate_config({"model": {
        "vocab_size": 64, "d_model": 32, "layout": "GGAG", "tie_embeddings": False,
        "attention": {"n_heads": 2, "n_kv_heads": 1},
        "gdn": {"n_heads": 2, "head_dim": 8, "chunk_size": 16, **gdn},
        "ffn": {"kind": "swiglu", "d_ffn": 48}}}).model


@pytest.mark.parametrize("gdn", [{}, {"n_v_heads": 4, "v_head_dim": 12, "conv_bias": True}])
def test_parameters_and_cache_bytes_are_counted_exactly(gdn):
    config = tiny_gdn_config(**gdn)
    model = build_model(config)
    cost = model_cost(config, context=100, dtype="fp32")
    assert cost.params == sum(p.numel() for p in model.parameters())
    from strata.inference.cache import StackCache

    cache = StackCache(model.blocks, batch_size=1, capacity=100)
    assert cache.nbytes == cost.cache_bytes


def test_sequence_flops_of_the_tiny_preset_by_hand():
    """Mamba-2's formula 3·L·(9·d_ssm·d_state + 2·d_ssm) with the Gated DeltaNet state in its place:
    4 value heads, key 32, value 48, 256 steps: 3·256·(9·4·32·48 + 2·4·48) = 768 · 55,680."""
    config = GatedDeltaNetConfig(n_heads=4, head_dim=32, v_head_dim=48, chunk_size=32)
    assert gdn_sequence_flops(config, 256) == 42_762_240


def test_a_bad_head_count_names_the_key():
    with pytest.raises(ValueError, match="n_v_heads"):
        GatedDeltaNetConfig(n_heads=3, n_v_heads=4)
    with pytest.raises(ValueError, match="gdn"):
        validate_config({"model": {"vocab_size": 64, "d_model": 32, "layout": "GG"}})
