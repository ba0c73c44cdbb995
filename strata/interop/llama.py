"""Meta's Llama (``LlamaForCausalLM``): strata's all-attention layout with SwiGLU FFNs.

Every Llama decoder layer is a strata ``A`` block; strata's attention is Llama's (GQA, RoPE with
optional Llama-3 scaling), with Q, K and V in one projection.
"""

from __future__ import annotations

from strata.config import ModelConfig
from strata.interop.family import (
    Family,
    attention_to_hf,
    attention_section,
    attention_to_strata,
    head_dim_of,
    model_section,
    inverted,
    model_pairs,
    prefixed,
    refuse_unless_default,
    renamed,
    rope_parameters,
    rope_section,
    swiglu_names,
)


def config_to_strata(hf) -> dict:
    refuse_unless_default(hf, "hidden_act", "silu", "the FFN activation")
    head_dim = head_dim_of(hf)
    return {
        **model_section(hf, "A" * hf.num_hidden_layers),
        "attention": attention_section(hf, rope_section(hf, head_dim)),
        "ffn": {"kind": "swiglu", "d_ffn": hf.intermediate_size, "bias": bool(hf.mlp_bias)},
    }


def _pairs(config: ModelConfig) -> dict[str, str]:
    """strata name -> Llama name, the attention's q/k/v aside."""
    pairs = model_pairs(config, "model.embed_tokens.weight", "model.norm.weight")
    for index in range(config.n_layers):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        pairs[ours + "mixer_norm.weight"] = theirs + "input_layernorm.weight"
        pairs[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        pairs |= prefixed(swiglu_names(config.ffn.bias), ours + "ffn.", theirs + "mlp.")
    return pairs


def weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _pairs(config))
    for index in range(config.n_layers):
        yield from attention_to_strata(hf, f"model.layers.{index}.self_attn.", f"blocks.{index}.mixer.",
                                       config.attention.bias)


def exportable(config: ModelConfig) -> str | None:
    if set(config.layout) != {"A"}:
        return f"Llama is all attention; the layout {config.layout} is not"
    if config.ffn.kind != "swiglu" or config.ffn.multipliers != (1.0, 1.0):
        return "Llama's FFN is a plain SwiGLU (ffn.kind swiglu, no multipliers)"
    attention = config.attention
    if attention.rope is None or attention.rope.fraction != 1 or attention.softmax_scale is not None:
        return "Llama rotates whole heads and has the 1/sqrt(head_dim) softmax scale"
    if (config.embedding_multiplier, config.logits_multiplier, config.residual_multiplier) != (1, 1, 1):
        return "Llama has no embedding, logits or residual multipliers"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    attention = config.attention
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn.d_ffn,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "head_dim": attention.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": rope_parameters(attention),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": attention.bias,
        "mlp_bias": config.ffn.bias,
    }


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _pairs(config))
    for index in range(config.n_layers):
        out |= attention_to_hf(state, f"blocks.{index}.mixer.", f"model.layers.{index}.self_attn.", config.attention)
    return out


FAMILY = Family("LlamaForCausalLM", "llama", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf, exportable)
