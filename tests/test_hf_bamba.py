"""Bamba in and out: a tiny random ``BambaForCausalLM`` saved to disk loads into strata with HF's
logits (1e-4) and greedy tokens; a strata inter layout with half-rotated heads exports to Bamba."""

import pytest

pytest.importorskip("transformers")

from transformers import BambaConfig, BambaForCausalLM  # noqa: E402

from hf_families import assert_exports, assert_imports, randomized  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.interop.pretrained import PretrainedError  # noqa: E402


def bamba_config(**overrides):
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_d_state=8,
                    mamba_n_groups=2, mamba_chunk_size=16, max_position_embeddings=256)
    return BambaConfig(**(settings | overrides))


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "attention_bias": True, "mamba_proj_bias": True}],
                         ids=["plain", "tied-biases"])
def test_bamba_imports_with_hf_logits_and_greedy_tokens(tmp_path, overrides):
    hf_model = randomized(BambaForCausalLM(bamba_config(**overrides)))
    loaded = assert_imports(hf_model, tmp_path, layout="MAMA")
    assert loaded.config.model.attention.rope.fraction == 0.5
    assert loaded.family == "BambaForCausalLM"


def test_inter_layout_with_half_rotated_heads_exports_to_bamba(tmp_path):
    config = validate_config({"model": {
        "vocab_size": 96, "d_model": 32, "layout": "MMAM", "tie_embeddings": False,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0, "fraction": 0.5}},
        "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
        "ffn": {"kind": "swiglu", "d_ffn": 48}}})
    assert_exports(config, tmp_path, "BambaForCausalLM")


def test_a_clamped_step_size_is_refused_naming_the_key(tmp_path):
    BambaForCausalLM(bamba_config(time_step_limit=(0.0, 0.1))).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match="time_step_limit"):
        from_pretrained(tmp_path)


def test_a_bf16_checkpoint_loads_as_float32_on_a_cpu_unless_asked(tmp_path):
    import torch

    hf_model = randomized(BambaForCausalLM(bamba_config())).to(torch.bfloat16)
    hf_model.save_pretrained(str(tmp_path))
    assert {p.dtype for p in from_pretrained(tmp_path).model.parameters()} == {torch.float32}
    loaded = from_pretrained(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    embedding = hf_model.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed.weight, embedding)
