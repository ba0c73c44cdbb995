"""Qwen3.5 in: tiny random ``Qwen3_5ForCausalLM`` and ``Qwen3_5MoeForCausalLM`` (more value heads
than key heads in the Gated DeltaNet, partial RoPE, tied or not) and their
``...ForConditionalGeneration`` forms (as Qwen3.5 checkpoints are published: a vision tower beside
the language model) saved to disk load into strata with HF's logits (1e-4) and greedy tokens on
text; an import exports as Qwen3-Next with the same logits."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

from hf_families import (  # noqa: E402
    assert_imports,
    assert_same_greedy,
    assert_same_logits,
    qwen_norms_near_zero,
    randomized,
)
from strata.cost.model import model_cost  # noqa: E402
from strata.interop.pretrained import save_hf  # noqa: E402

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=12, max_position_embeddings=256,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "linear_num_value_heads": 2,
     "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}},
], ids=["untied", "tied-half-rotary"])
def test_qwen3_5_imports_with_hf_logits_and_greedy_tokens_and_exports_as_qwen3_next(tmp_path, overrides, moe):
    settings = TEXT | (MOE if moe else {}) | overrides
    config = Qwen3_5MoeTextConfig(**settings) if moe else Qwen3_5TextConfig(**settings)
    hf_model = qwen_norms_near_zero(randomized((Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config)))
    loaded = assert_imports(hf_model, tmp_path / "qwen3_5", layout="GGGA")
    model = loaded.config.model
    assert loaded.family == type(hf_model).__name__
    assert model_cost(model).params == sum(p.numel() for p in hf_model.parameters())
    assert model.tie_embeddings == bool(overrides)
    if moe:  # the top-k weights renormalised, one gated shared expert
        assert (model.ffn.moe.softmax_over, model.ffn.moe.n_experts, model.ffn.moe.shared_gate) == ("chosen", 4, True)
    else:
        assert (model.ffn.kind, model.ffn.d_ffn) == ("swiglu", 48)
    assert (model.gdn.n_heads, model.gdn.n_v_heads) == (2, overrides.get("linear_num_value_heads", 4))
    assert model.attention.rope.fraction == overrides.get("rope_parameters", {}).get("partial_rotary_factor", 0.25)
    exported = AutoModelForCausalLM.from_pretrained(str(save_hf(loaded.model, None, tmp_path / "next"))).eval()
    assert type(exported).__name__ == "Qwen3NextForCausalLM"
    assert_same_logits(loaded.model, exported, model.vocab_size)


class TextOnly(torch.nn.Module):
    """A Qwen3_5ForConditionalGeneration as the causal LM of its text (what the helpers call)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_published_multimodal_checkpoint_imports_its_language_model(tmp_path, tied, moe):
    text = TEXT | (MOE if moe else {}) | {"tie_word_embeddings": tied}
    config = (Qwen3_5MoeConfig if moe else Qwen3_5Config)(text_config=text, vision_config=VISION, tie_word_embeddings=tied)
    hf_model = qwen_norms_near_zero(randomized((Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration)(config)))
    hf_model.save_pretrained(str(tmp_path / "vl"))
    from strata import from_pretrained

    loaded = from_pretrained(tmp_path / "vl")
    assert loaded.family == type(hf_model).__name__ and loaded.config.model.layout == "GGGA"
    assert loaded.config.model.tie_embeddings == tied
    language = sum(p.numel() for name, p in hf_model.named_parameters() if ".visual." not in f".{name}")
    assert model_cost(loaded.config.model).params == language
    assert_same_logits(loaded.model, TextOnly(hf_model), 96)
    assert_same_greedy(loaded.model, TextOnly(hf_model), 96)
