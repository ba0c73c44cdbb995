"""Llama, Mamba2 and the original mamba_ssm layout in and out: tiny random HF models saved to disk
load into strata with HF's logits (1e-4) and greedy tokens; strata's transformer and Mamba-2
layouts export back; a mamba_ssm directory written from the same weights as an HF Mamba2 loads to
the same logits."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM  # noqa: E402

from hf_families import assert_exports, assert_imports, assert_same_logits, randomized  # noqa: E402
from strata import from_pretrained, load_config  # noqa: E402
from strata.interop.pretrained import PretrainedError  # noqa: E402

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
MAMBA2 = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, expand=2, num_heads=4, head_dim=16, state_size=8,
              n_groups=2, chunk_size=16)


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 12},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
], ids=["plain", "tied-biases-head-dim", "llama3-rope"])
def test_llama_imports(tmp_path, overrides):
    assert_imports(randomized(LlamaForCausalLM(LlamaConfig(**(LLAMA | overrides)))), tmp_path, layout="AAA")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mamba2_imports(tmp_path, tie):
    hf_model = randomized(Mamba2ForCausalLM(Mamba2Config(**MAMBA2, tie_word_embeddings=tie)))
    assert_imports(hf_model, tmp_path, layout="MMM")


def test_transformer_and_mamba2_layouts_export(tmp_path):
    assert_exports(load_config("configs/tiny/transformer.yaml"), tmp_path / "llama", "LlamaForCausalLM")
    mamba = load_config("configs/tiny/mamba2.yaml", overrides=["model.ffn={kind: none}"])
    assert_exports(mamba, tmp_path / "mamba2", "Mamba2ForCausalLM")


def test_a_layout_no_family_expresses_is_refused_with_the_reasons(tmp_path):
    from strata.interop.pretrained import save_hf
    from strata.models import build_model

    model = build_model(load_config("configs/tiny/intra.yaml"))
    with pytest.raises(PretrainedError, match="maps onto no Hugging Face family") as error:
        save_hf(model, None, tmp_path / "out")
    assert "LlamaForCausalLM:" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def write_mamba_ssm_twin(hf_dir, out, vocab_size):
    """The HF Mamba2 checkpoint in ``hf_dir`` rewritten as mamba_ssm ships one (state-spaces/
    mamba2-130m): its config keys, ``backbone.embedding`` for the embedding, tied head left out,
    and a vocabulary that mamba_ssm pads up to a multiple of 8."""
    out.mkdir()
    weights = load_file(str(hf_dir / "model.safetensors"))
    renamed = {name.replace("backbone.embeddings.", "backbone.embedding."): tensor for name, tensor in weights.items()
               if name != "lm_head.weight"}
    save_file(renamed, str(out / "model.safetensors"))
    config = {"d_model": MAMBA2["hidden_size"], "d_intermediate": 0, "n_layer": MAMBA2["num_hidden_layers"],
              "vocab_size": vocab_size, "ssm_cfg": {"layer": "Mamba2", "d_state": MAMBA2["state_size"], "headdim": 16,
                                                    "ngroups": MAMBA2["n_groups"], "chunk_size": 16},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    (out / "config.json").write_text(json.dumps(config))


def test_a_mamba_ssm_directory_loads_like_its_hf_twin(tmp_path):
    hf_model = randomized(Mamba2ForCausalLM(Mamba2Config(**MAMBA2, tie_word_embeddings=True)))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    write_mamba_ssm_twin(tmp_path / "hf", tmp_path / "ssm", vocab_size=93)
    loaded = from_pretrained(tmp_path / "ssm")
    assert loaded.config.model.vocab_size == 96 and loaded.config.model.layout == "MMM"
    assert_same_logits(loaded.model, hf_model, 93)
    twin = from_pretrained(tmp_path / "hf")
    x = torch.randint(0, 93, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), twin.model(x))


def test_a_mamba_ssm_option_strata_lacks_is_refused_naming_it(tmp_path):
    hf_model = Mamba2ForCausalLM(Mamba2Config(**MAMBA2, tie_word_embeddings=True))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    write_mamba_ssm_twin(tmp_path / "hf", tmp_path / "ssm", vocab_size=96)
    config = json.loads((tmp_path / "ssm" / "config.json").read_text())
    config["ssm_cfg"]["norm_before_gate"] = True
    (tmp_path / "ssm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="ssm_cfg.norm_before_gate"):
        from_pretrained(tmp_path / "ssm")


def test_an_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(PretrainedError, match="GPT2LMHeadModel"):
        from_pretrained(tmp_path)
