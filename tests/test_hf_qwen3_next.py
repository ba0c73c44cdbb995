"""Qwen3-Next in and out: a tiny random ``Qwen3NextForCausalLM`` (sparse MoE with or without
``norm_topk_prob``, or dense; more value heads than key heads in its Gated DeltaNet; tied or not)
saved to disk loads into strata with HF's logits (1e-4) and greedy tokens; a strata G/A hybrid
with gated, Q/K-normalised attention exports to it."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402

from hf_families import assert_exports, assert_imports, assert_same_logits, qwen_norms_near_zero, randomized  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata.cost.model import model_cost  # noqa: E402
from strata.interop.pretrained import PretrainedError, hf_family  # noqa: E402

ARCHITECTURE = "Qwen3NextForCausalLM"


def qwen_config(**overrides):
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=8, linear_value_head_dim=12, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=24, shared_expert_intermediate_size=40, max_position_embeddings=256)
    return Qwen3NextConfig(**(settings | overrides))


def qwen_model(**overrides):
    """Every weight redrawn; the zero-centred norms near 0, as trained ones are."""
    return qwen_norms_near_zero(randomized(Qwen3NextForCausalLM(qwen_config(**overrides))))


@pytest.mark.parametrize("overrides", [
    {},
    {"norm_topk_prob": False, "tie_word_embeddings": True, "attention_bias": True},
    {"num_experts": 0, "linear_num_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                                                                         "partial_rotary_factor": 0.5}},
], ids=["moe-renormalised", "moe-raw-tied-bias", "dense-half-rotary"])
def test_qwen3_next_imports_with_hf_logits_and_greedy_tokens(tmp_path, overrides):
    hf_model = qwen_model(**overrides)
    loaded = assert_imports(hf_model, tmp_path, layout="GGGA")
    model = loaded.config.model
    assert loaded.family == ARCHITECTURE
    assert model_cost(model).params == sum(p.numel() for p in hf_model.parameters())  # strata info counts exactly
    attention, gdn = model.attention, model.gdn
    assert (attention.output_gate, attention.qk_norm, attention.head_dim) == (True, "head", 16)
    assert attention.rope.fraction == overrides.get("rope_parameters", {}).get("partial_rotary_factor", 0.25)
    assert (gdn.n_heads, gdn.n_v_heads, gdn.head_dim, gdn.v_head_dim) == (2, overrides.get("linear_num_value_heads", 4), 8, 12)
    if overrides.get("num_experts") == 0:
        assert (model.ffn.kind, model.ffn.d_ffn) == ("swiglu", 48)
    else:
        moe = model.ffn.moe
        assert (moe.router, moe.n_experts, moe.top_k, moe.n_shared, moe.shared_gate) == ("softmax", 4, 2, 1, True)
        assert moe.softmax_over == ("chosen" if overrides.get("norm_topk_prob", True) else "all")
        assert (model.ffn.expert_width, model.ffn.shared_width) == (24, 40)


def test_experts_under_transformers_5_names_and_mtp_layers_import_too(tmp_path):
    """save_pretrained writes one name per expert; a checkpoint under the module's own fused names
    (experts.gate_up_proj, experts.down_proj) loads the same, and multi-token prediction weights
    (mtp.*, which transformers drops too) are passed over."""
    hf_model = qwen_model()
    hf_model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    fused = {name: tensor for name, tensor in tensors.items() if ".mlp.experts." not in name}
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp.experts."
        fused[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{prefix}{e}.gate_proj.weight"], tensors[f"{prefix}{e}.up_proj.weight"]]) for e in range(4)])
        fused[prefix + "down_proj"] = torch.stack([tensors[f"{prefix}{e}.down_proj.weight"] for e in range(4)])
    fused["mtp.fc.weight"] = torch.zeros(32, 64)
    save_file(fused, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert_same_logits(from_pretrained(tmp_path).model, hf_model, 96)


def strata_qwen(**changes):
    model = {
        "vocab_size": 96, "d_model": 32, "layout": "GAGA", "tie_embeddings": False, "norm_eps": 1e-6,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "rope": {"theta": 10000.0, "fraction": 0.25},
                      "output_gate": True, "qk_norm": "head"},
        "gdn": {"n_heads": 2, "n_v_heads": 4, "head_dim": 8, "v_head_dim": 12, "chunk_size": 16},
        "ffn": {"kind": "moe", "d_ffn": 48, "moe": {"router": "softmax", "softmax_over": "all", "n_experts": 4, "top_k": 2,
                                                     "n_shared": 1, "shared_gate": True, "d_expert": 24, "d_shared": 40}},
    }
    return validate_config({"model": model | changes})


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True, "ffn": {"kind": "swiglu", "d_ffn": 48}, "attention": {
    "n_heads": 4, "n_kv_heads": 4, "head_dim": 8, "bias": True, "rope": {"theta": 500.0, "fraction": 0.5}, "output_gate": True,
    "qk_norm": "head"}}], ids=["moe", "dense-tied-bias"])
def test_a_gated_delta_net_hybrid_with_qwen_attention_exports_to_qwen3_next(tmp_path, changes):
    assert_exports(strata_qwen(**changes), tmp_path, ARCHITECTURE)


def test_export_refuses_what_qwen3_next_cannot_express_and_others_never_drop_the_new_options():
    with pytest.raises(PretrainedError, match="allow_neg_eigval"):
        hf_family(strata_qwen(gdn={"n_heads": 2, "head_dim": 8, "allow_neg_eigval": True}).model)
    # Attention alone with Q/K norms: Llama's layout, but Llama has no Q/K norms.
    llama_like = validate_config({"model": {"vocab_size": 96, "d_model": 32, "layout": "AA", "ffn": {"kind": "swiglu", "d_ffn": 48},
                                            "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": "head"}}})
    with pytest.raises(PretrainedError, match="LlamaForCausalLM: it cannot express attention.qk_norm"):
        hf_family(llama_like.model)


@pytest.mark.parametrize("overrides, key", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]}, "layer_types"),
])
def test_what_strata_cannot_express_is_refused_naming_the_key(tmp_path, overrides, key):
    Qwen3NextForCausalLM(qwen_config(**overrides)).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match=f"key '{key}'"):
        from_pretrained(tmp_path)


def test_layers_all_dense_through_mlp_only_layers_import_as_a_swiglu(tmp_path):
    loaded = assert_imports(qwen_model(mlp_only_layers=[0, 1, 2, 3]), tmp_path)
    assert (loaded.config.model.ffn.kind, loaded.config.model.ffn.d_ffn) == ("swiglu", 48)
