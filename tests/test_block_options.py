"""The block options the Hugging Face families brought (Qwen3-Next's gated attention, Q/K norms and
gated shared expert, OLMo's post-norm blocks among them): every combination builds, the cost model
counts its parameters exactly, gradients flow, and cached decoding equals the full forward; each
new option also keeps packed documents apart, carries state, and computes what it says."""

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
    assert_counts_trains_and_decodes(*build(layout, ffn, attention))


def assert_counts_trains_and_decodes(config, model):
    """The cost model counts every parameter, each gets a gradient, cached decoding equals the full forward."""
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


# --- Qwen3-Next's and OLMo Hybrid's options: Q/K norms, post-norm blocks, the gated shared expert ---

GDN = {"n_heads": 2, "n_v_heads": 4, "head_dim": 8, "v_head_dim": 12, "chunk_size": 4, "allow_neg_eigval": True}
QWEN_MOE = {"kind": "moe", "d_ffn": 48, "moe": {"router": "softmax", "softmax_over": "all", "top_k": 2, "n_experts": 4,
                                                "d_shared": 40, "shared_gate": True}}
NEW_OPTIONS = {
    # Qwen3-Next's attention: each head's Q and K normalised, then a quarter of it rotated; gated output
    "qk-norm-head": dict(layout="AWMA", attention={"qk_norm": "head", "rope": {"theta": 10000.0, "fraction": 0.25}}),
    # OLMo 2's: Q and K normalised over their whole width, attention (and here F) blocks post-norm
    "qk-norm-full-post-norm": dict(layout="MAFMF", post_norm="AF", ffn=FFNS["relu2"],
                                   attention={"qk_norm": "full", "rope": {"theta": 10000.0}}),
    # OLMo Hybrid's shape: post-norm NoPE attention between pre-norm Gated DeltaNet blocks
    "olmo-hybrid": dict(layout="GAGA", post_norm="A", gdn=GDN, attention={"qk_norm": "full", "output_gate": False}),
    # Qwen3-Next's: its MoE (the chosen experts' share of the full softmax, a gated shared expert)
    "qwen3-next": dict(layout="GAMA", gdn=GDN | {"allow_neg_eigval": False}, ffn=QWEN_MOE,
                       attention={"qk_norm": "head", "rope": {"theta": 10000.0, "fraction": 0.5}}),
}


def build_new(case, **settings):
    options = NEW_OPTIONS[case] | settings
    model = dict(BASE, ffn=FFNS["swiglu-multipliers"]) | {key: value for key, value in options.items() if key != "attention"}
    model["attention"] = BASE["attention"] | options.get("attention", {})
    if "W" in model["layout"]:
        model["sliding_window"] = {"window": 4, "sinks": 1}
    config = validate_config({"model": model}).model
    torch.manual_seed(0)
    return config, strata.build_model(config)


@pytest.mark.parametrize("case", list(NEW_OPTIONS))
def test_the_new_options_count_exactly_train_and_decode_as_they_run(case):
    assert_counts_trains_and_decodes(*build_new(case))


@pytest.mark.parametrize("case", list(NEW_OPTIONS))
def test_the_new_options_keep_packed_documents_apart_and_carry_state(case):
    """Two documents packed in a row give the logits of each run alone; a carried state over two
    windows gives the logits of the whole sequence."""
    _, model = build_new(case, layout=NEW_OPTIONS[case]["layout"].replace("W", "A"))
    model.eval()
    tokens = torch.randint(0, 64, (1, 19), generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0] * 11 + [1] * 8])
    with torch.no_grad():
        packed = model(tokens, segment_ids=ids)
        alone = torch.cat([model(tokens[:, :11]), model(tokens[:, 11:])], 1)
        state = model.carried_state()
        carried = torch.cat([model(tokens[:, :7], state=state), model(tokens[:, 7:], state=state)], 1)
        whole = model(tokens)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(carried, whole, atol=1e-5, rtol=1e-5)


def _attention_logits(qk_norm: str, scaled_rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a one-block attention model before and after the Q/K projection rows
    ``scaled_rows`` (weights and biases) are multiplied by 5."""
    config = validate_config({"model": dict(BASE, layout="A", ffn=FFNS["relu2"], norm_eps=1e-12,
                                            attention=BASE["attention"] | {"qk_norm": qk_norm, "output_gate": False,
                                                                           "rope": {"theta": 100.0}})}).model
    torch.manual_seed(0)
    model = strata.build_model(config).eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, param in model.named_parameters():  # large enough that attention is far from uniform
            param.copy_(torch.randn(param.shape) * 0.2 + name.endswith("norm.weight"))
        before = model(tokens)
        projection = model.blocks[0].mixer.qkv_proj
        projection.weight[scaled_rows] *= 5
        projection.bias[scaled_rows] *= 5
        return before, model(tokens)


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(qk_norm):
    """With either norm, scaling every Q and K channel changes nothing; scaling one query head
    changes nothing per head, but shifts the whole-width norm (and, without a norm, the logits)."""
    head_dim, q_width, k_width = 8, 32, 16
    before, after = _attention_logits(qk_norm, slice(0, q_width + k_width))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    before, after = _attention_logits(qk_norm, slice(0, head_dim))
    if qk_norm == "head":
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    else:
        assert (after - before).abs().max() > 1e-3
    before, after = _attention_logits("none", slice(0, head_dim))
    assert (after - before).abs().max() > 1e-3


def test_qk_norm_weights_are_a_head_wide_or_the_projections_wide():
    for qk_norm, widths in (("head", (8, 8)), ("full", (32, 16))):
        _, model = build_new("qk-norm-head", attention={"qk_norm": qk_norm, "rope": None})
        mixer = model.blocks[0].mixer
        assert (mixer.q_norm.weight.numel(), mixer.k_norm.weight.numel()) == widths
    _, plain = build("MAMA", "relu2", "nope-gated")
    assert plain.blocks[1].mixer.q_norm is None


def test_a_post_norm_block_normalises_each_sublayers_output():
    config, model = build_new("qk-norm-full-post-norm")
    model.eval()
    attention_block, ffn_block, mamba_block = model.blocks[1], model.blocks[2], model.blocks[0]
    assert (attention_block.post_norm, ffn_block.post_norm, mamba_block.post_norm) == (True, True, False)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    m = config.residual_multiplier
    with torch.no_grad():
        mixed = x + m * attention_block.mixer_norm(attention_block.mixer(x))
        torch.testing.assert_close(attention_block(x), mixed)
        torch.testing.assert_close(ffn_block(x), x + m * ffn_block.ffn_norm(ffn_block.ffn(x)))
        pre_norm = x + m * mamba_block.mixer(mamba_block.mixer_norm(x))
        torch.testing.assert_close(mamba_block(x), pre_norm)


def test_the_qwen3_next_moe_weighs_by_the_full_softmax_and_gates_the_shared_expert():
    """softmax over all experts, the top-k's probabilities unrenormalised, plus the shared expert
    times sigmoid(shared_gate(x)), written out token by token."""
    config, model = build_new("qwen3-next")
    moe = model.blocks[0].ffn
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = []
        for token in x:
            probabilities = torch.softmax(moe.router(token), dim=-1)
            top, chosen = probabilities.topk(2)
            assert top.sum() < 1
            routed = sum(p * moe.experts[int(e)](token) for p, e in zip(top, chosen))
            expected.append(routed + torch.sigmoid(moe.shared_gate(token)) * moe.shared[0](token))
        torch.testing.assert_close(moe(x), torch.stack(expected), atol=1e-6, rtol=1e-5)
        chosen_config, chosen_model = build_new("qwen3-next", ffn=QWEN_MOE | {"moe": QWEN_MOE["moe"] | {"softmax_over": "chosen"}})
        chosen_model.load_state_dict(model.state_dict())
        assert (chosen_model.blocks[0].ffn(x) - moe(x)).abs().max() > 1e-4


@pytest.mark.parametrize("overrides, key", [
    ({"post_norm": "AX"}, "model.post_norm"),
    ({"post_norm": "AA"}, "model.post_norm"),
    ({"attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": "both"}}, "model.attention.qk_norm"),
    ({"ffn": {"kind": "moe", "d_ffn": 48, "moe": {"softmax_over": "all"}}}, "model.ffn.moe.softmax_over"),
    ({"ffn": {"kind": "moe", "d_ffn": 48, "moe": {"n_shared": 0, "shared_gate": True}}}, "model.ffn.moe.shared_gate"),
    ({"ffn": {"kind": "moe", "d_ffn": 48, "moe": {"router": "softmax", "top_k": 2, "normalize_weights": True}}},
     "model.ffn.moe.normalize_weights"),
    ({"layout": "H", "hybrid": {"attention": {"n_heads": 2, "n_kv_heads": 2, "head_dim": 8, "qk_norm": "head"},
                                "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16}}}, "model.hybrid.attention.qk_norm"),
])
def test_a_bad_new_option_is_refused_naming_its_key(overrides, key):
    from strata.config import ConfigError

    model = {"vocab_size": 64, "d_model": 32, "layout": "A", "attention": {"n_heads": 4, "n_kv_heads": 2}} | overrides
    with pytest.raises(ConfigError, match=f": {key}: "):
        validate_config({"model": model})
