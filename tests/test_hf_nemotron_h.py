"""Nemotron-H in and out: a tiny random ``NemotronHForCausalLM`` saved to disk loads into strata with
HF's logits (1e-4) and greedy tokens, from transformers' ``backbone.`` names or the hub's; a strata
layout of one-sublayer blocks (NoPE attention, Mamba-2, relu2 F blocks) exports to Nemotron-H."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

from hf_families import assert_exports, assert_imports, assert_same_logits, randomized, saved  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata.interop.pretrained import PretrainedError, hf_family  # noqa: E402


def nemotron_h_config(**overrides):
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, hybrid_override_pattern="M*-M-",
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=16,
                    n_groups=2, ssm_state_size=8, chunk_size=16, max_position_embeddings=256)
    return NemotronHConfig(**(settings | overrides))


def renamed_checkpoint(directory, rename) -> None:
    """Rewrite ``directory``'s model.safetensors with every name passed through ``rename``
    (None drops the tensor)."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    save_file({rename(name): tensor for name, tensor in tensors.items() if rename(name) is not None}, str(path),
              metadata={"format": "pt"})


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "attention_bias": True, "use_bias": True,
                                            "mlp_bias": True, "use_conv_bias": False}],
                         ids=["plain", "tied-biases"])
def test_nemotron_h_imports_with_hf_logits_and_greedy_tokens(tmp_path, overrides):
    hf_model = randomized(NemotronHForCausalLM(nemotron_h_config(**overrides)))
    loaded = assert_imports(hf_model, tmp_path, layout="MAFMF")
    model = loaded.config.model
    assert loaded.family == "NemotronHForCausalLM"
    assert model.attention.rope is None and model.ffn.kind == "relu2"
    assert model.mamba.bias == bool(overrides) and model.mamba.conv_bias != bool(overrides)
    assert model.ffn.bias == bool(overrides)
    assert loaded.model.blocks[0].ffn is None and loaded.model.blocks[2].mixer is None


def test_a_layout_without_mlp_layers_has_no_ffn(tmp_path):
    hf_model = randomized(NemotronHForCausalLM(nemotron_h_config(hybrid_override_pattern="M*M")))
    loaded = assert_imports(hf_model, tmp_path, layout="MAM")
    assert loaded.config.model.ffn.kind == "none"
    assert all(block.ffn is None for block in loaded.model.blocks)


def test_a_checkpoint_with_the_other_prefix_loads_to_the_same_logits(tmp_path):
    """save_pretrained writes the hub's ``backbone.``; transformers' in-memory ``model.`` loads too."""
    hf_model = randomized(NemotronHForCausalLM(nemotron_h_config()))
    directory = saved(hf_model, tmp_path)
    names = load_file(str(directory / "model.safetensors")).keys()
    assert "backbone.embeddings.weight" in names and "backbone.layers.1.mixer.q_proj.weight" in names
    renamed_checkpoint(directory, lambda name: name.replace("backbone.", "model.", 1))
    loaded = from_pretrained(directory)
    assert_same_logits(loaded.model, hf_model, 96)


def test_a_tied_checkpoint_without_a_head_uses_the_embedding(tmp_path):
    """NVIDIA's code ties the head when tie_word_embeddings; a checkpoint may then lack lm_head."""
    hf_model = randomized(NemotronHForCausalLM(nemotron_h_config(tie_word_embeddings=True)))
    with torch.no_grad():
        hf_model.lm_head.weight.copy_(hf_model.model.embeddings.weight)
    directory = saved(hf_model, tmp_path)
    renamed_checkpoint(directory, lambda name: None if name == "lm_head.weight" else name)
    assert_same_logits(from_pretrained(directory).model, hf_model, 96)


def test_attention_biases_a_checkpoint_holds_are_read(tmp_path):
    """transformers 5 builds no attention biases; NVIDIA's code (attention_bias true) does."""
    directory = saved(randomized(NemotronHForCausalLM(nemotron_h_config(attention_bias=True))), tmp_path)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    widths = {"q": 32, "k": 16, "v": 16, "o": 32}
    biases = {f"backbone.layers.1.mixer.{part}_proj.bias": torch.randn(width) for part, width in widths.items()}
    save_file(tensors | biases, str(path), metadata={"format": "pt"})
    mixer = from_pretrained(directory).model.blocks[1].mixer
    prefix = "backbone.layers.1.mixer."
    torch.testing.assert_close(mixer.qkv_proj.bias, torch.cat([biases[f"{prefix}{part}_proj.bias"] for part in "qkv"]))
    torch.testing.assert_close(mixer.o_proj.bias, biases[prefix + "o_proj.bias"])


def nemotron_h_strata_config(**model):
    return validate_config({"model": {
        "vocab_size": 96, "d_model": 32, "layout": "MAFMF", "tie_embeddings": False,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": None},
        "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
        "ffn": {"kind": "relu2", "d_ffn": 48}} | model})


@pytest.mark.parametrize("model", [{}, {"tie_embeddings": True, "ffn": {"kind": "relu2", "d_ffn": 48, "bias": True},
                                        "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "n_groups": 2,
                                                  "chunk_size": 16, "bias": True}}],
                         ids=["plain", "tied-biases"])
def test_one_sublayer_blocks_export_to_nemotron_h(tmp_path, model):
    config = nemotron_h_strata_config(**model)
    assert hf_family(config.model).architecture == "NemotronHForCausalLM"
    ours, hf_model = assert_exports(config, tmp_path, "NemotronHForCausalLM")
    names = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert {"backbone.embeddings.weight", "backbone.layers.2.mixer.up_proj.weight", "lm_head.weight"} <= names
    back = from_pretrained(tmp_path / "hf")  # and into strata again
    assert back.config.model.layout == "MAFMF"
    assert_same_logits(back.model, hf_model, 96)


def test_a_layout_without_mlp_blocks_exports_without_ffn(tmp_path):
    config = nemotron_h_strata_config(layout="MAM", ffn={"kind": "none"})
    _, hf_model = assert_exports(config, tmp_path, "NemotronHForCausalLM")
    assert hf_model.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]


@pytest.mark.parametrize("model, reason", [
    ({"layout": "MAM", "ffn": {"kind": "swiglu", "d_ffn": 48}, "attention": {"n_heads": 4, "n_kv_heads": 2}}, "relu2"),
    ({"attention": {"n_heads": 4, "n_kv_heads": 2}}, "rope null"),
    ({"attention": {"n_heads": 4, "n_kv_heads": 2, "rope": None, "bias": True}}, "attention_bias"),
    ({"layout": "MFMF"}, "attention (A) block"),
], ids=["inter-swiglu", "rope", "attention-bias", "no-attention"])
def test_what_nemotron_h_cannot_express_is_refused_in_one_line(model, reason):
    from strata.interop import nemotron_h

    refused = nemotron_h.exportable(nemotron_h_strata_config(**model).model)
    assert refused is not None and reason in refused and "\n" not in refused


@pytest.mark.parametrize("overrides, key", [({"hybrid_override_pattern": "M*E"}, "layers_block_type"),
                                            ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
                                            ({"sliding_window": 16}, "sliding_window"),
                                            ({"time_step_limit": (0.0, 0.1)}, "time_step_limit")],
                         ids=["moe", "mtp", "sliding-window", "step-limit"])
def test_unsupported_options_are_refused_naming_the_key(tmp_path, overrides, key):
    nemotron_h_config(**overrides).save_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match=key):
        from_pretrained(tmp_path)
