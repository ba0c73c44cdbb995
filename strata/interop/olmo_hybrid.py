"""Ai2's OLMo Hybrid (``OlmoHybridForCausalLM``): an inter-layer hybrid of Gated DeltaNet and
attention blocks, each with a SwiGLU FFN.

Every layer is a strata block: ``G`` where ``layer_types`` says linear_attention, ``A`` where it
says full_attention. The two kinds are normalised differently, as OLMo 2 began: a Gated DeltaNet
layer is pre-norm, x + mixer(norm(x)); an attention layer is post-norm, x + norm(attn(x)) then
x + norm(mlp(x)), strata's ``post_norm: A``. The attention RMSNorms its projected queries and keys
over their whole width (``qk_norm: full``) and has RoPE only when ``rope_parameters`` gives a
``rope_theta`` (the released checkpoints have none: NoPE, ``rope: null``). The Gated DeltaNet has
separate projections (q, k, v, the output gate g, β's b, the decay's a: strata's ``in_proj`` rows
[q, k, v, g, b, a]), β doubled with ``linear_allow_neg_eigval`` (``gdn.allow_neg_eigval``) and an
output norm whose epsilon transformers fixes at 1e-5 (``gdn.norm_eps``).

Checkpoints name some weights as OLMo-core does, and transformers renames them as it loads:
``attention_layer_norm`` is its ``input_layernorm``, ``feedforward_layer_norm`` its
``post_attention_layernorm`` (in an attention layer that is the norm after the attention), and
the conv is three, ``q_conv1d``, ``k_conv1d``, ``v_conv1d``, concatenated into ``conv1d``. Import
reads either form; export writes the checkpoints' (what save_pretrained writes).

Left unmapped because they change nothing at inference: ``attention_dropout``,
``initializer_range``, the initialisation ranges ``linear_a_log_min/max`` and ``linear_dt_*``,
``use_cache`` and the special token ids (export writes none: the tokenizer holds them).
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.interop.family import (
    Family,
    attention_section,
    attention_to_hf,
    attention_to_strata,
    head_dim_of,
    inverted,
    model_pairs,
    model_section,
    prefixed,
    refuse_unless_default,
    renamed,
    require,
    rope_parameters,
    rope_section,
    swiglu_names,
)

SYMBOLS = {"linear_attention": "G", "full_attention": "A"}
LAYER_TYPES = {symbol: kind for kind, symbol in SYMBOLS.items()}
POST_NORM = "A"
GDN_NORM_EPS = 1e-5  # transformers' (and fla's FusedRMSNormGated's) epsilon of the output norm
# Projections of the Gated DeltaNet in strata's ``in_proj`` order.
IN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")
CONVS = ("q_conv1d", "k_conv1d", "v_conv1d")
# Norm names: the checkpoints' (OLMo-core's, written by save_pretrained) then transformers' modules'.
INPUT_NORM = ("attention_layer_norm", "input_layernorm")
POST_ATTENTION_NORM = ("feedforward_layer_norm", "post_attention_layernorm")
POST_FEEDFORWARD_NORM = ("post_feedforward_layernorm",)


# --- config --------------------------------------------------------------------------------------


def _layout(hf) -> str:
    kinds = list(hf.layer_types or ())
    require(len(kinds) == hf.num_hidden_layers, "layer_types", f"{len(kinds)} entries for num_hidden_layers {hf.num_hidden_layers}")
    unknown = sorted(set(kinds) - set(SYMBOLS))
    require(not unknown, "layer_types", f"{unknown} are not supported; strata has {', '.join(SYMBOLS)}")
    return "".join(SYMBOLS[kind] for kind in kinds)


def _rope(hf, head_dim: int) -> dict | None:
    """None (NoPE) unless ``rope_parameters`` gives a ``rope_theta``, as transformers decides."""
    params = hf.rope_parameters or {}
    if params.get("rope_theta") is None:
        return None
    # OLMo's default RoPE rotates every channel whatever partial_rotary_factor says: refuse it.
    fraction = params.get("partial_rotary_factor", 1.0)
    require(fraction == 1, "rope_parameters.partial_rotary_factor", f"{fraction}: OLMo Hybrid rotates whole heads")
    return rope_section(hf, head_dim)


def config_to_strata(hf) -> dict:
    refuse_unless_default(hf, "hidden_act", "silu", "the MLP and conv activation")
    layout = _layout(hf)
    section = {
        **model_section(hf, layout),
        "post_norm": POST_NORM,
        "ffn": {"kind": "swiglu", "d_ffn": hf.intermediate_size},
    }
    if "A" in layout:
        head_dim = head_dim_of(hf)
        section["attention"] = attention_section(hf, _rope(hf, head_dim), qk_norm="full")
    if "G" in layout:
        section["gdn"] = {
            "n_heads": hf.linear_num_key_heads,
            "n_v_heads": hf.linear_num_value_heads,
            "head_dim": hf.linear_key_head_dim,
            "v_head_dim": hf.linear_value_head_dim,
            "conv_kernel": hf.linear_conv_kernel_dim,
            "allow_neg_eigval": bool(hf.linear_allow_neg_eigval),
            "norm_eps": GDN_NORM_EPS,
        }
    return section


# --- weights -------------------------------------------------------------------------------------


def _present(hf, prefix: str, names: tuple[str, ...]) -> str:
    """The first of ``names`` (+ ``.weight``) the checkpoint holds (the first, to be reported missing, if none)."""
    return next((f"{prefix}{name}.weight" for name in names if f"{prefix}{name}.weight" in hf), f"{prefix}{names[0]}.weight")


def _norm_names(symbol: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The HF names of a layer's mixer norm and FFN norm (strata's mixer_norm, ffn_norm)."""
    return (POST_ATTENTION_NORM, POST_FEEDFORWARD_NORM) if symbol == "A" else (INPUT_NORM, POST_ATTENTION_NORM)


def _plain_pairs(config: ModelConfig, index: int, symbol: str) -> dict[str, str]:
    """strata name -> HF name of layer ``index``'s weights that map one to one, norms aside."""
    ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
    pairs = prefixed(swiglu_names(False), ours + "ffn.", theirs + "mlp.")
    if symbol == "A":
        pairs |= {ours + "mixer.q_norm.weight": theirs + "self_attn.q_norm.weight",
                  ours + "mixer.k_norm.weight": theirs + "self_attn.k_norm.weight"}
    else:
        pairs |= {ours + "mixer." + name: theirs + "linear_attn." + hf_name for name, hf_name in
                  (("A_log", "A_log"), ("dt_bias", "dt_bias"), ("norm.weight", "o_norm.weight"),
                   ("out_proj.weight", "o_proj.weight"))}
    return pairs


def _model_pairs(config: ModelConfig) -> dict[str, str]:
    return model_pairs(config, "model.embed_tokens.weight", "model.norm.weight")


def weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _model_pairs(config))
    for index, symbol in enumerate(config.layout):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        mixer_norm, ffn_norm = _norm_names(symbol)
        yield ours + "mixer_norm.weight", hf[_present(hf, theirs, mixer_norm)]
        yield ours + "ffn_norm.weight", hf[_present(hf, theirs, ffn_norm)]
        yield from renamed(hf, _plain_pairs(config, index, symbol))
        if symbol == "A":
            yield from attention_to_strata(hf, theirs + "self_attn.", ours + "mixer.", config.attention.bias)
        else:
            attn = theirs + "linear_attn."
            yield ours + "mixer.in_proj.weight", torch.cat([hf[f"{attn}{name}.weight"] for name in IN_PROJECTIONS])
            fused = attn + "conv1d.weight"
            yield ours + "mixer.conv1d.weight", hf[fused] if fused in hf else torch.cat(
                [hf[f"{attn}{name}.weight"] for name in CONVS])


# --- export --------------------------------------------------------------------------------------


def exportable(config: ModelConfig) -> str | None:
    if set(config.layout) != {"A", "G"}:
        return (f"OLMo Hybrid has attention (A) and Gated DeltaNet (G) blocks, at least one of each; "
                f"the layout {config.layout} has not")
    if POST_NORM not in config.post_norm or "G" in config.post_norm:
        return "OLMo Hybrid's attention blocks normalise their outputs and its Gated DeltaNet blocks their inputs (post_norm A)"
    ffn = config.ffn
    if ffn.kind != "swiglu" or ffn.bias or ffn.multipliers != (1.0, 1.0):
        return "every OLMo Hybrid block has a SwiGLU FFN without biases or multipliers"
    attention = config.attention
    if attention.qk_norm != "full" or attention.output_gate:
        return "OLMo Hybrid's attention normalises Q and K over their whole width (qk_norm full) and has no output gate"
    if attention.softmax_scale is not None or (attention.rope is not None and attention.rope.fraction != 1):
        return "OLMo Hybrid's attention has the 1/sqrt(head_dim) softmax scale and rotates whole heads, or has no RoPE"
    gdn = config.gdn
    if gdn.conv_bias or gdn.norm_eps != GDN_NORM_EPS:
        return f"OLMo Hybrid's Gated DeltaNet has no conv bias and its norm's epsilon is {GDN_NORM_EPS} (gdn.norm_eps)"
    if (config.embedding_multiplier, config.logits_multiplier, config.residual_multiplier) != (1, 1, 1):
        return "OLMo Hybrid has no embedding, logits or residual multipliers"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    attention, gdn = config.attention, config.gdn
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn.d_ffn,
        "num_hidden_layers": config.n_layers,
        "layer_types": [LAYER_TYPES[symbol] for symbol in config.layout],
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "attention_bias": attention.bias,
        # transformers reads a rope_theta of None as NoPE
        "rope_parameters": rope_parameters(attention) if attention.rope is not None else {"rope_type": "default", "rope_theta": None},
        "linear_num_key_heads": gdn.n_heads,
        "linear_num_value_heads": gdn.n_v_heads,
        "linear_key_head_dim": gdn.head_dim,
        "linear_value_head_dim": gdn.v_head_dim,
        "linear_conv_kernel_dim": gdn.conv_kernel,
        "linear_allow_neg_eigval": gdn.allow_neg_eigval,
    }
    if attention.head_dim != config.d_model // attention.n_heads:
        out["head_dim"] = attention.head_dim
    return out


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _model_pairs(config))
    gdn = config.gdn
    for index, symbol in enumerate(config.layout):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        mixer_norm, ffn_norm = _norm_names(symbol)
        out[f"{theirs}{mixer_norm[0]}.weight"] = state[ours + "mixer_norm.weight"]
        out[f"{theirs}{ffn_norm[0]}.weight"] = state[ours + "ffn_norm.weight"]
        out |= inverted(state, _plain_pairs(config, index, symbol))
        if symbol == "A":
            out |= attention_to_hf(state, ours + "mixer.", theirs + "self_attn.", config.attention)
        else:
            attn = theirs + "linear_attn."
            widths = (gdn.key_width, gdn.key_width, gdn.value_width, gdn.value_width, gdn.n_v_heads, gdn.n_v_heads)
            for name, tensor in zip(IN_PROJECTIONS, state[ours + "mixer.in_proj.weight"].split(widths), strict=True):
                out[f"{attn}{name}.weight"] = tensor
            convs = state[ours + "mixer.conv1d.weight"].split((gdn.key_width, gdn.key_width, gdn.value_width))
            for name, tensor in zip(CONVS, convs, strict=True):
                out[f"{attn}{name}.weight"] = tensor
    return out


FAMILY = Family("OlmoHybridForCausalLM", "olmo_hybrid", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf,
                exportable)
