"""Granite-4.0-H in and out: a tiny random ``GraniteMoeHybridForCausalLM`` (dense or MoE, RoPE or
NoPE, μP multipliers) saved to disk loads into strata with HF's logits (1e-4) and greedy tokens;
strata's plain inter-layer hybrid and a softmax-routed MoE export to it."""

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM  # noqa: E402

import strata  # noqa: E402
from hf_families import assert_exports, assert_imports, assert_same_logits, randomized  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata.interop.pretrained import PretrainedError  # noqa: E402

ARCHITECTURE = "GraniteMoeHybridForCausalLM"


def granite_config(**overrides):
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=24, shared_intermediate_size=48,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=4, mamba_d_state=8,
                    mamba_n_groups=2, mamba_chunk_size=16, max_position_embeddings=256, num_local_experts=0,
                    position_embedding_type="rope")
    return GraniteMoeHybridConfig(**(settings | overrides))


MULTIPLIERS = dict(embedding_multiplier=2.0, logits_scaling=3.0, residual_multiplier=0.7, attention_multiplier=0.2)


@pytest.mark.parametrize("overrides", [
    {},
    {"num_local_experts": 4, "num_experts_per_tok": 2},
    {"position_embedding_type": "nope", "tie_word_embeddings": True, "attention_bias": True},
    MULTIPLIERS | {"num_local_experts": 4, "num_experts_per_tok": 2, "position_embedding_type": None},
], ids=["dense-rope", "moe-rope", "nope-tied-bias", "multipliers-moe-nope"])
def test_granite_imports_with_hf_logits_and_greedy_tokens(tmp_path, overrides):
    hf_model = randomized(GraniteMoeHybridForCausalLM(granite_config(**overrides)))
    loaded = assert_imports(hf_model, tmp_path, layout="MAMA")
    model = loaded.config.model
    assert loaded.family == ARCHITECTURE
    assert (model.attention.rope is None) == (overrides.get("position_embedding_type", "rope") != "rope")
    assert model.attention.softmax_scale == overrides.get("attention_multiplier", 1.0)
    if overrides.get("num_local_experts"):
        moe = model.ffn.moe
        assert (model.ffn.kind, moe.router, moe.n_experts, moe.top_k, moe.n_shared) == ("moe", "softmax", 4, 2, 1)
        assert (model.ffn.expert_width, model.ffn.shared_width) == (24, 48)
    else:
        assert (model.ffn.kind, model.ffn.d_ffn) == ("swiglu", 48)
    if overrides is MULTIPLIERS or "logits_scaling" in overrides:
        assert (model.embedding_multiplier, model.residual_multiplier) == (2.0, 0.7)
        assert model.logits_multiplier == pytest.approx(1 / 3)


def test_experts_under_transformers_5_names_import_too(tmp_path):
    """save_pretrained writes the pre-v5 expert names; a checkpoint under the module's own names
    (experts.gate_up_proj, router.weight) loads the same."""
    hf_model = randomized(GraniteMoeHybridForCausalLM(granite_config(num_local_experts=4, num_experts_per_tok=2)))
    hf_model.save_pretrained(str(tmp_path))
    renames = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
               "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
               "block_sparse_moe.router.layer.weight": "block_sparse_moe.router.weight"}
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert any(name.endswith(tuple(renames)) for name in tensors)
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        renamed[name] = tensor
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path)
    assert_same_logits(loaded.model, hf_model, 96)


def test_the_plain_inter_layer_hybrid_exports_to_granite(tmp_path):
    config = strata.load_config("configs/tiny/inter.yaml")
    assert config.model.mamba.width(config.model.d_model) % config.model.d_model == 0
    assert config.model.attention.rope.fraction == 1
    assert_exports(config, tmp_path, ARCHITECTURE)


def test_a_softmax_routed_moe_with_multipliers_exports_to_granite(tmp_path):
    config = validate_config({"model": {
        "vocab_size": 96, "d_model": 32, "layout": "MAMA", "tie_embeddings": False,
        "embedding_multiplier": 2.0, "logits_multiplier": 0.25, "residual_multiplier": 0.7,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0}, "softmax_scale": 0.2},
        "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
        "ffn": {"kind": "moe", "d_ffn": 48, "moe": {"router": "softmax", "n_experts": 4, "top_k": 2, "n_shared": 1,
                                                     "d_expert": 24, "d_shared": 40}}}})
    assert_exports(config, tmp_path, ARCHITECTURE)


def test_a_gelu_activation_is_refused_naming_the_key(tmp_path):
    GraniteMoeHybridForCausalLM(granite_config(hidden_act="gelu")).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match="hidden_act"):
        from_pretrained(tmp_path)
