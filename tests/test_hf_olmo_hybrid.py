"""OLMo Hybrid in and out: a tiny random ``OlmoHybridForCausalLM`` (NoPE or RoPE, β in (0, 2) or
(0, 1), more value heads than key heads, tied or not) saved to disk loads into strata with HF's
logits (1e-4) and greedy tokens: pre-norm Gated DeltaNet blocks and post-norm attention blocks
with whole-width Q/K norms. A strata model of that shape exports to it."""

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import OlmoHybridConfig, OlmoHybridForCausalLM  # noqa: E402

import torch  # noqa: E402
from hf_families import assert_exports, assert_imports, assert_same_logits, randomized  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata.cost.model import model_cost  # noqa: E402
from strata.interop.pretrained import PretrainedError, hf_family  # noqa: E402

ARCHITECTURE = "OlmoHybridForCausalLM"
NOPE = {"rope_type": "default", "rope_theta": None}  # how OLMo Hybrid's released configs say NoPE
ROPE = {"rope_type": "default", "rope_theta": 1000.0}


def olmo_config(**overrides):
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, linear_num_key_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                    max_position_embeddings=256, pad_token_id=None, eos_token_id=None, rope_parameters=NOPE,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
    return OlmoHybridConfig(**(settings | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    {"rope_parameters": ROPE, "linear_allow_neg_eigval": False, "tie_word_embeddings": True, "attention_bias": True},
    {"linear_num_value_heads": 8, "linear_num_key_heads": 2, "num_key_value_heads": 4},
], ids=["nope-neg-eigval", "rope-tied-bias", "more-value-heads"])
def test_olmo_hybrid_imports_with_hf_logits_and_greedy_tokens(tmp_path, overrides):
    hf_model = randomized(OlmoHybridForCausalLM(olmo_config(**overrides)))
    loaded = assert_imports(hf_model, tmp_path, layout="GAGA")
    model = loaded.config.model
    assert loaded.family == ARCHITECTURE
    assert model_cost(model).params == sum(p.numel() for p in hf_model.parameters())  # strata info counts exactly
    assert model.post_norm == "A" and model.attention.qk_norm == "full" and not model.attention.output_gate
    assert (model.attention.rope is None) == ("rope_parameters" not in overrides)
    gdn = model.gdn
    assert gdn.allow_neg_eigval == overrides.get("linear_allow_neg_eigval", True)
    assert (gdn.n_heads, gdn.n_v_heads, gdn.norm_eps) == (overrides.get("linear_num_key_heads", 4),
                                                          overrides.get("linear_num_value_heads", 4), 1e-5)


def test_weights_under_transformers_module_names_import_too(tmp_path):
    """save_pretrained writes OLMo-core's names (attention_layer_norm, feedforward_layer_norm, the
    three q/k/v convs); a checkpoint under transformers' module names loads the same."""
    hf_model = randomized(OlmoHybridForCausalLM(olmo_config(rope_parameters=ROPE)))
    hf_model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.attention_layer_norm.weight" in tensors and "model.layers.1.feedforward_layer_norm.weight" in tensors
    renamed = {}
    for name, tensor in tensors.items():
        if "_conv1d" not in name:
            renamed[name.replace("attention_layer_norm", "input_layernorm")
                        .replace("feedforward_layer_norm", "post_attention_layernorm")] = tensor
    for layer in (0, 2):
        convs = [tensors[f"model.layers.{layer}.linear_attn.{part}_conv1d.weight"] for part in "qkv"]
        renamed[f"model.layers.{layer}.linear_attn.conv1d.weight"] = torch.cat(convs)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert_same_logits(from_pretrained(tmp_path).model, hf_model, 96)


def strata_olmo(**changes):
    model = {
        "vocab_size": 96, "d_model": 32, "layout": "GGAG", "tie_embeddings": False, "post_norm": "A",
        "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": None, "qk_norm": "full"},
        "gdn": {"n_heads": 2, "n_v_heads": 4, "head_dim": 8, "v_head_dim": 12, "chunk_size": 16, "allow_neg_eigval": True,
                "norm_eps": 1e-5},
        "ffn": {"kind": "swiglu", "d_ffn": 48},
    }
    return validate_config({"model": model | changes})


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True, "attention": {"n_heads": 4, "n_kv_heads": 4, "head_dim": 16,
                                                                                 "rope": {"theta": 500.0}, "qk_norm": "full", "bias": True}}],
                         ids=["nope", "rope-tied-wide-heads-bias"])
def test_a_post_norm_attention_and_gated_delta_net_hybrid_exports_to_olmo_hybrid(tmp_path, changes):
    assert_exports(strata_olmo(**changes), tmp_path, ARCHITECTURE)


@pytest.mark.parametrize("changes, reason", [
    ({"post_norm": ""}, "post_norm A"),
    ({"gdn": {"n_heads": 2, "head_dim": 8}}, "gdn.norm_eps"),
    ({"layout": "GGGG"}, "at least one of each"),
])
def test_export_refuses_what_olmo_hybrid_cannot_express(changes, reason):
    with pytest.raises(PretrainedError, match=f"OlmoHybridForCausalLM: [^;]*{reason}"):
        hf_family(strata_olmo(**changes).model)


@pytest.mark.parametrize("overrides, key", [
    ({"rope_parameters": ROPE | {"partial_rotary_factor": 0.5}}, "rope_parameters.partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_what_strata_cannot_express_is_refused_naming_the_key(tmp_path, overrides, key):
    OlmoHybridForCausalLM(olmo_config(**overrides)).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match=f"key '{key}'"):
        from_pretrained(tmp_path)
