"""IBM's Bamba (``BambaForCausalLM``): an inter-layer hybrid of Mamba-2 and attention blocks.

Every layer is a strata block with a SwiGLU FFN: ``M`` where ``attn_layer_indices`` does not name
it, ``A`` where it does. Bamba's attention rotates half of each head (``partial_rotary_factor``
0.5, which transformers fixes for Bamba), strata's ``rope.fraction``.
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
    mamba_pairs,
    model_pairs,
    prefixed,
    refuse_unless_default,
    renamed,
    require,
    rope_parameters,
    rope_section,
    swiglu_names,
)

BAMBA_ROPE_FRACTION = 0.5


def mamba_section(hf, d_ssm: int) -> dict:
    """strata's ``mamba`` section from the ``mamba_*`` keys Bamba, Falcon-H1 and Granite share."""
    refuse_unless_default(hf, "time_step_limit", (0.0, float("inf")), "a clamped step size")
    refuse_unless_default(hf, "hidden_act", "silu", "the conv and gate activation")
    return {
        "d_ssm": d_ssm,
        "d_state": hf.mamba_d_state,
        "head_dim": hf.mamba_d_head,
        "n_groups": hf.mamba_n_groups,
        "conv_kernel": hf.mamba_d_conv,
        "chunk_size": hf.mamba_chunk_size,
        "bias": bool(hf.mamba_proj_bias),
        "conv_bias": bool(hf.mamba_conv_bias),
    }


def config_to_strata(hf) -> dict:
    attention_layers = set(hf.attn_layer_indices or ())
    require(all(0 <= i < hf.num_hidden_layers for i in attention_layers), "attn_layer_indices",
            f"{sorted(attention_layers)} names layers outside 0..{hf.num_hidden_layers - 1}")
    head_dim = head_dim_of(hf)
    fraction = (hf.rope_parameters or {}).get("partial_rotary_factor", BAMBA_ROPE_FRACTION)
    return {
        **model_section(hf, "".join("A" if i in attention_layers else "M" for i in range(hf.num_hidden_layers))),
        "attention": attention_section(hf, rope_section(hf, head_dim, fraction)),
        "mamba": mamba_section(hf, hf.mamba_expand * hf.hidden_size),
        "ffn": {"kind": "swiglu", "d_ffn": hf.intermediate_size, "bias": bool(hf.mlp_bias)},
    }


def _layer_pairs(config: ModelConfig, index: int, symbol: str) -> dict[str, str]:
    """strata name -> Bamba name for layer ``index``, its attention's q/k/v aside."""
    ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
    pairs = {ours + "mixer_norm.weight": theirs + "input_layernorm.weight",
             ours + "ffn_norm.weight": theirs + "pre_ff_layernorm.weight"}
    pairs |= prefixed(swiglu_names(config.ffn.bias), ours + "ffn.", theirs + "feed_forward.")
    if symbol == "M":
        pairs |= mamba_pairs(config.mamba, ours + "mixer.", theirs + "mamba.")
    return pairs


def _model_pairs(config: ModelConfig) -> dict[str, str]:
    return model_pairs(config, "model.embed_tokens.weight", "model.final_layernorm.weight")


def weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _model_pairs(config))
    for index, symbol in enumerate(config.layout):
        yield from renamed(hf, _layer_pairs(config, index, symbol))
        if symbol == "A":
            yield from attention_to_strata(hf, f"model.layers.{index}.self_attn.", f"blocks.{index}.mixer.",
                                           config.attention.bias)


def exportable(config: ModelConfig) -> str | None:
    if not set(config.layout) <= {"A", "M"}:
        return f"Bamba has attention (A) and Mamba-2 (M) blocks; the layout {config.layout} has others"
    if config.ffn.kind != "swiglu" or config.ffn.multipliers != (1.0, 1.0):
        return "every Bamba block has a plain SwiGLU FFN (ffn.kind swiglu, no multipliers)"
    if "M" in config.layout:
        mamba = config.mamba
        if mamba.norm != "gate_then_norm" or mamba.projection_multipliers is not None:
            return "Bamba's Mamba-2 gates before its norm and has no projection multipliers"
        if mamba.width(config.d_model) % config.d_model:
            return "Bamba's Mamba-2 width is expand × d_model: mamba.d_ssm must be a multiple of d_model"
    if "A" in config.layout:
        attention = config.attention
        if attention.rope is None or attention.rope.fraction != BAMBA_ROPE_FRACTION or attention.softmax_scale is not None:
            return ("Bamba's attention rotates half of each head (transformers fixes partial_rotary_factor 0.5) "
                    "and has the 1/sqrt(head_dim) softmax scale")
    if (config.embedding_multiplier, config.logits_multiplier, config.residual_multiplier) != (1, 1, 1):
        return "Bamba has no embedding, logits or residual multipliers"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    mamba = config.mamba
    attention = config.attention
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn.d_ffn,
        "num_hidden_layers": config.n_layers,
        "attn_layer_indices": [i for i, symbol in enumerate(config.layout) if symbol == "A"],
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "mlp_bias": config.ffn.bias,
    }
    if attention is not None:
        out |= {"num_attention_heads": attention.n_heads, "num_key_value_heads": attention.n_kv_heads,
                "attention_bias": attention.bias, "rope_parameters": rope_parameters(attention)}
        if attention.head_dim != config.d_model // attention.n_heads:
            out["head_dim"] = attention.head_dim
    if mamba is not None:
        d_ssm = mamba.width(config.d_model)
        out |= {"mamba_expand": d_ssm // config.d_model, "mamba_n_heads": d_ssm // mamba.head_dim,
                "mamba_d_head": mamba.head_dim, "mamba_n_groups": mamba.n_groups, "mamba_d_state": mamba.d_state,
                "mamba_d_conv": mamba.conv_kernel, "mamba_chunk_size": mamba.chunk_size,
                "mamba_proj_bias": mamba.bias, "mamba_conv_bias": mamba.conv_bias}
    return out


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _model_pairs(config))
    for index, symbol in enumerate(config.layout):
        out |= inverted(state, _layer_pairs(config, index, symbol))
        if symbol == "A":
            out |= attention_to_hf(state, f"blocks.{index}.mixer.", f"model.layers.{index}.self_attn.", config.attention)
    return out


FAMILY = Family("BambaForCausalLM", "bamba", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf, exportable)
