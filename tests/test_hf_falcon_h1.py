"""Falcon-H1 in and out: a tiny random ``FalconH1ForCausalLM`` saved to disk loads into strata as an
all-``H`` layout with HF's logits (1e-4) and greedy tokens, μP multipliers and gated-norm orders
included; strata's parallel hybrid exports to Falcon-H1 in both its add/separate and the paper's
concat/joint form."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import FalconH1Config, FalconH1ForCausalLM  # noqa: E402

from hf_families import assert_exports, assert_imports, randomized  # noqa: E402
import strata  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata.interop import falcon_h1  # noqa: E402
from strata.interop.pretrained import PretrainedError  # noqa: E402

LAYERS = 2
MULTIPLIERS = dict(embedding_multiplier=2.0, lm_head_multiplier=0.7, key_multiplier=1.3, attention_in_multiplier=0.8,
                   attention_out_multiplier=1.2, ssm_in_multiplier=0.9, ssm_out_multiplier=1.1,
                   ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9], mlp_multipliers=[0.6, 1.4])


def falcon_h1_config(**overrides):
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
                    num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                    mamba_n_groups=2, mamba_chunk_size=16, max_position_embeddings=256)
    return FalconH1Config(**(settings | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    MULTIPLIERS,
    {"mamba_rms_norm": True, "mamba_norm_before_gate": True},
    {"mamba_rms_norm": True, "mamba_norm_before_gate": False},
    {"tie_word_embeddings": True, "mamba_proj_bias": True, "mamba_conv_bias": True, "mlp_bias": True},
], ids=["plain", "multipliers", "norm-before-gate", "gate-before-norm", "tied-biases"])
def test_falcon_h1_imports_with_hf_logits_and_greedy_tokens(tmp_path, overrides):
    hf_model = randomized(FalconH1ForCausalLM(falcon_h1_config(**overrides)))
    loaded = assert_imports(hf_model, tmp_path, layout="H" * LAYERS)
    hybrid = loaded.config.model.hybrid
    assert (hybrid.fusion, hybrid.out_proj, hybrid.norm) == ("add", "separate", "none")
    assert loaded.family == "FalconH1ForCausalLM"


# Falcon-H1's own form, and the hybrid paper's "falcon_h1" design (configs/sweeps/intra-design.yaml).
DESIGNS = [{"fusion": "add", "out_proj": "separate"}, {"fusion": "concat", "out_proj": "joint"}]


def strata_config(**hybrid):
    return validate_config({"model": {
        # init_std well above the default, so that q·k, and with it the softmax scale, weighs in the logits.
        "vocab_size": 96, "d_model": 32, "layout": "HHH", "tie_embeddings": False, "init_std": 0.25,
        "embedding_multiplier": 1.5, "logits_multiplier": 0.8,
        "hybrid": {"attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "v_head_dim": 16, "softmax_scale": 0.3,
                                 "rope": {"theta": 10000.0}},
                   "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16,
                             "norm": "norm_then_gate", "bias": True, "projection_multipliers": [0.5, 1.5, 0.7, 1.3, 0.9]},
                   "norm": "none", "scale": "none", "in_multipliers": [0.8, 0.9], "out_multipliers": [1.2, 1.1]} | hybrid,
        "ffn": {"kind": "swiglu", "d_ffn": 48, "bias": True, "multipliers": [0.6, 1.4]}}})


@pytest.mark.parametrize("design", DESIGNS, ids=["add-separate", "concat-joint"])
def test_parallel_hybrid_exports_to_falcon_h1(tmp_path, design):
    assert_exports(strata_config(**design), tmp_path, "FalconH1ForCausalLM")


@pytest.mark.parametrize("design", DESIGNS, ids=["add-separate", "concat-joint"])
def test_weights_go_to_falcon_h1_names_and_back(design):
    config = strata_config(**design).model
    state = strata.build_model(config).state_dict()
    back = dict(falcon_h1.weights_to_strata(config, falcon_h1.weights_to_hf(config, state)))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_exports_that_falcon_h1_cannot_express_say_why():
    widened = strata_config(fusion="concat", out_proj="joint")
    widened.model.hybrid.attention.v_head_dim = 32
    assert "v_head_dim" in falcon_h1.exportable(widened.model)
    assert "norm none" in falcon_h1.exportable(strata_config(fusion="diff", norm="group").model)


@pytest.mark.parametrize("key", ["projectors_bias", "attention_bias"])
def test_an_output_projection_bias_is_refused_naming_the_key(tmp_path, key):
    FalconH1ForCausalLM(falcon_h1_config(**{key: True})).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match=key):
        from_pretrained(tmp_path)


def test_a_clamped_step_size_is_refused_naming_the_key(tmp_path):
    FalconH1ForCausalLM(falcon_h1_config(time_step_limit=(0.0, 0.1))).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match="time_step_limit"):
        from_pretrained(tmp_path)
