"""TII's Falcon-H1 (``FalconH1ForCausalLM``): a parallel hybrid, attention and Mamba-2 side by side in every layer.

Every layer is a strata ``H`` block with a SwiGLU FFN: the intra-layer hybrid with no branch norm,
no scale, and each branch projected on its own then added (``fusion: add``, ``out_proj:
separate``), its attention values ``head_dim`` wide. Falcon-H1's μP multipliers are strata
constants: ``attention_in``/``ssm_in`` and ``attention_out``/``ssm_out`` the hybrid's
``in_multipliers``/``out_multipliers`` (attention first), ``ssm_multipliers`` the Mamba-2
``projection_multipliers``, ``mlp_multipliers`` the SwiGLU's, ``embedding_multiplier`` and
``lm_head_multiplier`` the model's. ``key_multiplier`` scales the keys, which enter only through
q·k: it is the softmax scale times sqrt(head_dim).

Export also takes the hybrid paper's "falcon_h1" design (no norm, ``fusion: concat``, one joint
``out_proj``): the joint projection's columns, [Mamba | attention] as concat orders them, are
Falcon-H1's two output projections.
"""

from __future__ import annotations

import math

import torch

from strata.config import ModelConfig
from strata.interop.bamba import mamba_section
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
    renamed,
    require,
    rope_parameters,
    rope_section,
    swiglu_names,
)

# HF's multiplier keys in strata's order: (attention, ssm), as the hybrid's a and b branches.
IN_MULTIPLIERS = ("attention_in_multiplier", "ssm_in_multiplier")
OUT_MULTIPLIERS = ("attention_out_multiplier", "ssm_out_multiplier")
# Multipliers strata keeps positive (the key one becomes a softmax scale).
POSITIVE_MULTIPLIERS = ("embedding_multiplier", "lm_head_multiplier", "key_multiplier")


def _multiplier(hf, key: str) -> float:
    value = getattr(hf, key, None)
    return 1.0 if value is None else float(value)


def _mamba_norm(hf) -> str:
    """FalconH1RMSNormGated: ``norm_before_gate`` gives RMSNorm(y)·silu(z), otherwise RMSNorm(y·silu(z))."""
    if not hf.mamba_rms_norm:
        return "gate_only"
    return "norm_then_gate" if hf.mamba_norm_before_gate else "gate_then_norm"


def config_to_strata(hf) -> dict:
    require(not hf.attention_bias, "attention_bias",
            "true also biases o_proj; strata's hybrid attention output (attn_out) has no bias")
    require(not hf.projectors_bias, "projectors_bias",
            "true biases mamba.out_proj; strata's hybrid Mamba output (ssm_out) has no bias")
    for key in POSITIVE_MULTIPLIERS:
        require(_multiplier(hf, key) > 0, key, f"{getattr(hf, key)!r}: strata implements positive multipliers here")
    rope = dict(hf.rope_parameters or {})
    require(rope.get("partial_rotary_factor", 1.0) == 1.0, "rope_parameters.partial_rotary_factor",
            f"{rope.get('partial_rotary_factor')!r}: Falcon-H1's attention rotates whole heads")
    head_dim = head_dim_of(hf)
    # The keys enter the attention only through q·k, so scaling them is scaling the softmax's logits.
    key_multiplier = _multiplier(hf, "key_multiplier")
    softmax_scale = None if key_multiplier == 1 else key_multiplier / math.sqrt(head_dim)
    ssm_multipliers = tuple(float(m) for m in hf.ssm_multipliers or (1.0,) * 5)
    mamba = mamba_section(hf, hf.mamba_d_ssm or int(hf.mamba_expand * hf.hidden_size))
    mamba |= {"norm": _mamba_norm(hf),
              "projection_multipliers": None if all(m == 1 for m in ssm_multipliers) else ssm_multipliers}
    return {
        **model_section(hf, "H" * hf.num_hidden_layers),
        "embedding_multiplier": _multiplier(hf, "embedding_multiplier"),
        "logits_multiplier": _multiplier(hf, "lm_head_multiplier"),
        "hybrid": {
            "attention": attention_section(hf, rope_section(hf, head_dim), bias=False, v_head_dim=head_dim,
                                           softmax_scale=softmax_scale),
            "mamba": mamba,
            "branches": "attn_ssm",
            "norm": "none",
            "scale": "none",
            "fusion": "add",
            "out_proj": "separate",
            "in_multipliers": [_multiplier(hf, key) for key in IN_MULTIPLIERS],
            "out_multipliers": [_multiplier(hf, key) for key in OUT_MULTIPLIERS],
        },
        "ffn": {"kind": "swiglu", "d_ffn": hf.intermediate_size, "bias": bool(hf.mlp_bias),
                "multipliers": [float(m) for m in hf.mlp_multipliers or (1.0, 1.0)]},
    }


def _layer_pairs(config: ModelConfig, index: int) -> dict[str, str]:
    """strata name -> Falcon-H1 name for layer ``index``: all but the attention's q/k/v and, with a
    joint projection, the output projections."""
    ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
    mamba = config.hybrid.mamba
    pairs = {ours + "mixer_norm.weight": theirs + "input_layernorm.weight",
             ours + "ffn_norm.weight": theirs + "pre_ff_layernorm.weight"}
    pairs |= prefixed(swiglu_names(config.ffn.bias), ours + "ffn.", theirs + "feed_forward.")
    # The hybrid's Mamba branch has no out_proj of its own (the hybrid's ssm_out is it).
    pairs |= mamba_pairs(mamba, ours + "mixer.ssm.", theirs + "mamba.", norm=mamba.norm != "gate_only", output=False)
    if config.hybrid.out_proj == "separate":
        pairs |= {ours + "mixer.ssm_out.weight": theirs + "mamba.out_proj.weight",
                  ours + "mixer.attn_out.weight": theirs + "self_attn.o_proj.weight"}
    return pairs


def _output_names(index: int) -> tuple[str, str, str]:
    """The joint projection's strata name and Falcon-H1's two names for its [Mamba | attention] columns."""
    theirs = f"model.layers.{index}."
    return f"blocks.{index}.mixer.out_proj.weight", theirs + "mamba.out_proj.weight", theirs + "self_attn.o_proj.weight"


def _model_pairs(config: ModelConfig) -> dict[str, str]:
    return model_pairs(config, "model.embed_tokens.weight", "model.final_layernorm.weight")


def weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _model_pairs(config))
    for index in range(config.n_layers):
        yield from renamed(hf, _layer_pairs(config, index))
        yield from attention_to_strata(hf, f"model.layers.{index}.self_attn.", f"blocks.{index}.mixer.attn.",
                                       config.hybrid.attention.bias, output=None)
        if config.hybrid.out_proj == "joint":
            joint, ssm, attention = _output_names(index)
            yield joint, torch.cat([hf[ssm], hf[attention]], dim=1)


def exportable(config: ModelConfig) -> str | None:
    if set(config.layout) != {"H"}:
        return f"every Falcon-H1 layer is an attention + Mamba-2 hybrid (H); the layout {config.layout} has others"
    hybrid = config.hybrid
    if (hybrid.branches, hybrid.norm, hybrid.scale, hybrid.share_value) != ("attn_ssm", "none", "none", False):
        return ("Falcon-H1's hybrid is attention beside Mamba-2 with no branch norm, scale or shared values "
                "(hybrid.branches attn_ssm, norm none, scale none, share_value false)")
    if (hybrid.fusion, hybrid.out_proj) not in (("add", "separate"), ("concat", "joint")):
        return (f"Falcon-H1 adds the branches' own output projections (hybrid.fusion add with out_proj separate, "
                f"or concat with joint), not {hybrid.fusion} with {hybrid.out_proj}")
    attention = hybrid.attention
    if attention.value_head_dim != attention.head_dim:
        return (f"Falcon-H1's attention values are head_dim ({attention.head_dim}) wide; "
                f"hybrid.attention.v_head_dim is {attention.value_head_dim}")
    if attention.rope is None or attention.rope.fraction != 1:
        return "Falcon-H1's attention rotates whole heads with RoPE (hybrid.attention.rope.fraction 1)"
    if attention.bias:
        return "Falcon-H1's attention_bias also biases o_proj, which strata's hybrid lacks (hybrid.attention.bias)"
    if config.ffn.kind != "swiglu":
        return f"every Falcon-H1 layer has a SwiGLU FFN (ffn.kind swiglu), not {config.ffn.kind}"
    if config.residual_multiplier != 1:
        return "Falcon-H1 has no residual multiplier"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    hybrid = config.hybrid
    attention, mamba = hybrid.attention, hybrid.mamba
    d_ssm = mamba.width(config.d_model)
    key_multiplier = 1.0 if attention.softmax_scale is None else attention.softmax_scale * math.sqrt(attention.head_dim)
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn.d_ffn,
        "num_hidden_layers": config.n_layers,
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "attention_bias": False,
        "rope_parameters": rope_parameters(attention),
        "mamba_d_ssm": d_ssm,
        "mamba_n_heads": d_ssm // mamba.head_dim,
        "mamba_d_head": mamba.head_dim,
        "mamba_n_groups": mamba.n_groups,
        "mamba_d_state": mamba.d_state,
        "mamba_d_conv": mamba.conv_kernel,
        "mamba_chunk_size": mamba.chunk_size,
        "mamba_proj_bias": mamba.bias,  # the in_proj's; the hybrid's output projections have none
        "projectors_bias": False,
        "mamba_conv_bias": mamba.conv_bias,
        "mamba_rms_norm": mamba.norm != "gate_only",
        "mamba_norm_before_gate": mamba.norm == "norm_then_gate",
        "mlp_bias": config.ffn.bias,
        "mlp_multipliers": list(config.ffn.multipliers),
        "ssm_multipliers": list(mamba.projection_multipliers or (1.0,) * 5),
        "key_multiplier": key_multiplier,
        "embedding_multiplier": config.embedding_multiplier,
        "lm_head_multiplier": config.logits_multiplier,
    }
    out |= dict(zip(IN_MULTIPLIERS, hybrid.in_multipliers)) | dict(zip(OUT_MULTIPLIERS, hybrid.out_multipliers))
    if attention.head_dim != config.d_model // attention.n_heads:
        out["head_dim"] = attention.head_dim
    return out


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _model_pairs(config))
    d_ssm = config.hybrid.mamba.width(config.d_model)
    for index in range(config.n_layers):
        out |= inverted(state, _layer_pairs(config, index))
        out |= attention_to_hf(state, f"blocks.{index}.mixer.attn.", f"model.layers.{index}.self_attn.",
                               config.hybrid.attention, output=None)
        if config.hybrid.out_proj == "joint":
            joint, ssm, attention = _output_names(index)
            out[ssm], out[attention] = state[joint].split([d_ssm, state[joint].shape[1] - d_ssm], dim=1)
    return out


FAMILY = Family("FalconH1ForCausalLM", "falcon_h1", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf,
                exportable)
