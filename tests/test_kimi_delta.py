"""Kimi Delta Attention (``K`` blocks): the delta rule with a decay per key channel, chunked against
its exact recurrence (outputs, states and gradients), and the mixer against transformers' own
``KimiLinearDeltaAttention`` with the same weights, whole and cached."""

import pytest
import torch
from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

from test_gated_deltanet import rule_inputs

from strata.config import KimiDeltaConfig, validate_config
from strata.cost.model import model_cost
from strata.inference import model_cache
from strata.models import build_model
from strata.nn.delta_rule import gated_delta_chunked, gated_delta_recurrent
from strata.nn.kimi_delta import KimiDeltaAttention


def channel_rule_inputs(length, log_decay=3.0, seed=0):
    """``rule_inputs`` with a log-decay per key channel in (−log_decay, 0]."""
    return rule_inputs(length, seed=seed, log_decay=(0.0, log_decay), per_channel=True)


@pytest.mark.parametrize("chunk", [16, 20, 64])  # 20: not a multiple of the sub-chunk, one sub-chunk of all
@pytest.mark.parametrize("length", [1, 50, 77, 129])
def test_the_chunked_rule_with_channel_decays_equals_the_recurrence_with_its_gradients(chunk, length):
    q, k, v, g, beta, state = inputs = channel_rule_inputs(length, seed=length + chunk)
    chunked = gated_delta_chunked(q, k, v, g, beta, chunk, initial_state=state)
    reference = gated_delta_recurrent(q, k, v, g, beta, initial_state=state)
    for ours, theirs in zip(chunked, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    probe = [torch.randn_like(x) for x in reference]
    grads = [torch.autograd.grad(sum((y * p).sum() for y, p in zip(result, probe, strict=True)), inputs)
             for result in (chunked, reference)]
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_strong_channel_decays_stay_finite_and_exact():
    """Log-decays down to −40 a step: over a 64-step chunk e^{γ} spans far more than fp32 holds,
    so any product through e^{−γ} would overflow; the sub-chunked pairs never form one."""
    q, k, v, g, beta, state = channel_rule_inputs(130, log_decay=40.0, seed=3)
    chunked = gated_delta_chunked(q, k, v, g, beta, 64, initial_state=state)
    reference = gated_delta_recurrent(q, k, v, g, beta, initial_state=state)
    for ours, theirs in zip(chunked, reference, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_resets_start_each_segment_from_a_zero_state_with_channel_decays():
    q, k, v, g, beta, _ = channel_rule_inputs(90, seed=4)
    resets = torch.zeros(2, 90, dtype=torch.bool)
    resets[:, [0, 20, 21, 64]] = True
    chunked, _ = gated_delta_chunked(q, k, v, g, beta, 32, resets=resets)
    reference, _ = gated_delta_recurrent(q, k, v, g, beta, resets=resets)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    alone, _ = gated_delta_recurrent(q[:, 21:64], k[:, 21:64], v[:, 21:64], g[:, 21:64], beta[:, 21:64])
    torch.testing.assert_close(chunked[:, 21:64], alone, atol=1e-5, rtol=0)


# --- the mixer against transformers ----------------------------------------------------------------


def hf_pair(heads=4, head_dim=16, d_model=64, conv_bias=False, seed=0):
    """transformers' KimiLinearDeltaAttention with random weights, and a strata K mixer holding them."""
    torch.manual_seed(seed)
    config = KimiLinearConfig(hidden_size=d_model, num_hidden_layers=1, rms_norm_eps=1e-6, vocab_size=100,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              linear_attn_config={"head_dim": head_dim, "num_heads": heads, "short_conv_kernel_size": 4,
                                                  "kda_layers": [1], "full_attn_layers": []})
    theirs = KimiLinearDeltaAttention(config, 0).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.3)
        theirs.forget_gate.A_log.uniform_(-1, 1)
    ours = KimiDeltaAttention(d_model, KimiDeltaConfig(n_heads=heads, head_dim=head_dim, chunk_size=16,
                                                       conv_bias=conv_bias), norm_eps=1e-6).eval()
    gate = theirs.forget_gate
    with torch.no_grad():
        ours.in_proj.weight.copy_(torch.cat([theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight,
                                             gate.f_a_proj.weight, theirs.g_a_proj.weight, theirs.b_proj.weight]))
        ours.f_b_proj.weight.copy_(gate.f_b_proj.weight)
        ours.g_b_proj.weight.copy_(theirs.g_b_proj.weight)
        ours.conv1d.weight.copy_(theirs.conv1d.weight)
        ours.A_log.copy_(gate.A_log.flatten())
        ours.dt_bias.copy_(gate.dt_bias)
        ours.norm.weight.copy_(theirs.o_norm.weight)
        ours.out_proj.weight.copy_(theirs.o_proj.weight)
    return theirs, ours


@pytest.mark.parametrize("length", [1, 37, 70])
def test_a_k_mixer_equals_transformers_kimi_delta_attention(length):
    theirs, ours = hf_pair()
    x = torch.randn(2, length, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_a_k_mixer_has_transformers_gradients():
    """Training sees the same mixer: every weight's gradient of a random projection of the output,
    through strata's chunked rule and through transformers' torch path, within 1e-4 of its scale."""
    theirs, ours = hf_pair(seed=1)
    x, probe = torch.randn(2, 70, 64), torch.randn(2, 70, 64)
    (ours(x) * probe).sum().backward()
    (theirs(x) * probe).sum().backward()
    gate = theirs.forget_gate
    in_proj = [theirs.q_proj, theirs.k_proj, theirs.v_proj, gate.f_a_proj, theirs.g_a_proj, theirs.b_proj]
    pairs = [(ours.in_proj.weight, torch.cat([linear.weight.grad for linear in in_proj])),
             (ours.f_b_proj.weight, gate.f_b_proj.weight.grad), (ours.g_b_proj.weight, theirs.g_b_proj.weight.grad),
             (ours.conv1d.weight, theirs.conv1d.weight.grad), (ours.A_log, gate.A_log.grad.flatten()),
             (ours.dt_bias, gate.dt_bias.grad), (ours.norm.weight, theirs.o_norm.weight.grad),
             (ours.out_proj.weight, theirs.o_proj.weight.grad)]
    for parameter, expected in pairs:
        torch.testing.assert_close(parameter.grad, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def stack(layout="KK", **kda):
    return validate_config({"model": {
        "vocab_size": 64, "d_model": 32, "layout": layout, "context_length": 128,
        "kda": {"n_heads": 2, "head_dim": 8, "chunk_size": 16, **kda}, "ffn": {"kind": "swiglu", "d_ffn": 64},
        **({"attention": {"n_heads": 2, "n_kv_heads": 1}} if "A" in layout else {}),
    }}).model


def test_prefill_then_steps_equal_the_whole_forward():
    """A prompt prefilled in two pieces (the chunked rule from a carried state), then token by token
    (one recurrence step each, the state updated in place): the logits of one whole forward."""
    torch.manual_seed(0)
    model = build_model(stack("KAK", conv_bias=True)).eval()
    tokens = torch.randint(0, 64, (2, 45))
    with torch.no_grad():
        whole = model(tokens)
        cache = model_cache(model, 2, 45)
        pieces = [model(tokens[:, :20], cache), model(tokens[:, 20:37], cache)]
        pieces += [model(tokens[:, t : t + 1], cache) for t in range(37, 45)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-4, rtol=1e-4)


def test_parameters_and_cache_bytes_are_counted_exactly():
    config = stack("KK", conv_bias=True)
    model = build_model(config)
    cost = model_cost(config, context=100, dtype="fp32")
    assert cost.params == sum(p.numel() for p in model.parameters())
    cache = model_cache(model, 1, 100)
    assert cost.cache_bytes == cache.nbytes


def test_a_layout_with_k_blocks_needs_the_kda_section():
    with pytest.raises(ValueError, match="kda"):
        validate_config({"model": {"vocab_size": 64, "d_model": 32, "layout": "KK", "context_length": 16}})
