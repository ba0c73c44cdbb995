"""The block options the Hugging Face families brought (and Qwen3-Next's gated attention): every
combination builds, the cost model counts its parameters exactly, gradients flow, and cached
decoding equals the full forward."""

import pytest
import torch

import strata
from strata.config import validate_config
from strata.cost.model import model_cost
from strata.inference.cache import StackCache

BASE = {
    "vocab_size": 64, "d_model": 32, "tie_embeddings": False,
    "attention": {"n_heads": 4, "n_kv_heads": 2, "bias": True, "rope": None, "output_gate": True},
    "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "bias": True, "conv_bias": False, "norm": "gate_only",
              "projection_multipliers": [1.0, 2.0, 0.5, 1.5, 0.8], "chunk_size": 8},
    "residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_multiplier": 0.3,
}
FFNS = {
    "relu2": {"kind": "relu2", "d_ffn": 48, "bias": True},
    "swiglu-multipliers": {"kind": "swiglu", "d_ffn": 48, "bias": True, "multipliers": [0.5, 2.0]},
    "softmax-moe": {"kind": "moe", "d_ffn": 48, "moe": {"router": "softmax", "top_k": 2, "d_shared": 40, "n_experts": 4}},
}
ATTENTIONS = {
    "nope-gated": {},
    "half-rope-scaled": {"rope": {"theta": 10000.0, "fraction": 0.5}, "softmax_scale": 0.2, "output_gate": False},
}


def build(layout, ffn, attention):
    model = dict(BASE, layout=layout, ffn=FFNS[ffn], attention=BASE["attention"] | ATTENTIONS[attention])
    if "W" in layout:
        model["sliding_window"] = {"window": 4, "sinks": 1}
    config = validate_config({"model": model}).model
    torch.manual_seed(0)
    return config, strata.build_model(config)


@pytest.mark.parametrize("layout", ["MAFMF", "MAMA", "AWMF"])
@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_every_option_counts_exactly_trains_and_decodes_as_it_runs(layout, ffn, attention):
    config, model = build(layout, ffn, attention)
    cost = model_cost(config)
    assert cost.params == sum(p.numel() for p in model.parameters())
    for block, block_cost in zip(model.blocks, cost.blocks):
        assert block_cost.params == sum(p.numel() for p in block.parameters()), block_cost
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    model(tokens).sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "experts" not in name), "a weight got no gradient"
    model.eval()
    with torch.no_grad():
        full = model(tokens)
        cache = StackCache(model.blocks, 2, 16)
        steps = [model(tokens[:, :6], cache)] + [model(tokens[:, t : t + 1], cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_the_output_gate_gates():
    """Gated attention is not the plain one with extra weights: the gate changes the output, and a
    gate far open (sigmoid → 1) gives the ungated block back."""
    _, gated = build("A", "relu2", "nope-gated")
    plain_config = validate_config({"model": dict(BASE, layout="A", ffn=FFNS["relu2"],
                                                  attention=BASE["attention"] | {"output_gate": False})}).model
    plain = strata.build_model(plain_config)
    attention = gated.blocks[0].mixer
    q, k, v, g = attention.qkv_proj.weight.split([*attention.qkv_widths, attention.gate_width])
    state = gated.state_dict()
    state["blocks.0.mixer.qkv_proj.weight"] = torch.cat([q, k, v])
    state["blocks.0.mixer.qkv_proj.bias"] = gated.blocks[0].mixer.qkv_proj.bias[: sum(attention.qkv_widths)]
    plain.load_state_dict(state)
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert (gated(tokens) - plain(tokens)).abs().max() > 1e-3
        attention.qkv_proj.bias[sum(attention.qkv_widths):] = 30.0  # sigmoid(30 + small) == 1 in fp32
        attention.qkv_proj.weight[sum(attention.qkv_widths):] = 0.0
        torch.testing.assert_close(gated(tokens), plain(tokens))


def test_rope_none_is_nope():
    config = validate_config({"model": dict(BASE, layout="A", ffn=FFNS["relu2"],
                                            attention=BASE["attention"] | {"rope": "none"})}).model
    assert config.attention.rope is None
