"""IBM's Granite-4.0-H (``GraniteMoeHybridForCausalLM``): an inter-layer hybrid of Mamba-2 and
attention blocks whose FFN is a SwiGLU "shared MLP", plus a softmax-routed MoE when
``num_local_experts`` > 0.

Every layer is a strata block: ``M`` where ``layer_types`` says mamba (``linear_attention`` in
transformers 5, ``mamba`` in older config files), ``A`` where it says attention
(``full_attention`` or ``attention``). Granite's μP constants are strata's: ``attention_multiplier``
is the softmax scale (always given: Granite has no 1/sqrt(head_dim) default), ``embedding_multiplier``
and ``residual_multiplier`` as they are, ``logits_scaling`` a divisor (``logits_multiplier`` 1/s).
Attention has full RoPE (``position_embedding_type`` "rope") or none ("nope" or null).

The FFN: dense (``num_local_experts`` 0) is strata's SwiGLU of width ``shared_intermediate_size``;
MoE is strata's softmax-router MoE with ``intermediate_size``-wide routed experts and one shared
expert, the shared MLP. Both store gate and up stacked, [gate; up] (``input_linear`` [2I, H], the
experts' [E, 2I, H]). Expert weights come under two sets of names: the pre-v5 ones that hub
checkpoints hold and transformers 5 still writes (``block_sparse_moe.input_linear.weight``,
``output_linear.weight``, ``router.layer.weight``) and transformers 5's in-memory ones
(``experts.gate_up_proj``, ``experts.down_proj``, ``router.weight``); import reads either, export
writes the first.

Left unmapped because they change nothing at inference: ``attention_dropout``,
``output_router_logits`` and ``router_aux_loss_coef`` (training only), ``initializer_range``,
``use_cache`` and the special token ids.
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.interop.bamba import mamba_section
from strata.interop.family import (
    Family,
    attention_to_hf,
    attention_section,
    attention_to_strata,
    default_softmax_scale,
    head_dim_of,
    model_section,
    inverted,
    mamba_pairs,
    model_pairs,
    refuse_unless_default,
    renamed,
    require,
    rope_parameters,
    rope_section,
)

MAMBA_TYPES = ("linear_attention", "mamba")
ATTENTION_TYPES = ("full_attention", "attention")
NOPE_TYPES = (None, "nope")
# Expert weights: the names checkpoints hold (pre-v5, written by save_pretrained) first, then
# transformers 5's module names; relative to ``block_sparse_moe.``.
ROUTER_NAMES = ("router.layer.weight", "router.weight")
GATE_UP_NAMES = ("input_linear.weight", "experts.gate_up_proj")
DOWN_NAMES = ("output_linear.weight", "experts.down_proj")


def _symbol(kind: str, index: int) -> str:
    require(kind in MAMBA_TYPES + ATTENTION_TYPES, "layer_types",
            f"{kind!r} (layer {index}) is not supported; strata has {', '.join(MAMBA_TYPES + ATTENTION_TYPES)}")
    return "M" if kind in MAMBA_TYPES else "A"


def _ffn_section(hf) -> dict:
    require(hf.shared_intermediate_size > 0, "shared_intermediate_size",
            f"{hf.shared_intermediate_size}: strata needs the shared MLP (a width above 0)")
    experts = hf.num_local_experts or 0
    if experts == 0:
        return {"kind": "swiglu", "d_ffn": hf.shared_intermediate_size}
    moe = {"router": "softmax", "n_experts": experts, "top_k": hf.num_experts_per_tok, "n_shared": 1,
           "d_expert": hf.intermediate_size, "d_shared": hf.shared_intermediate_size}
    return {"kind": "moe", "d_ffn": 2 * hf.intermediate_size, "moe": moe}


def _rope(hf, head_dim: int) -> dict | None:
    kind = hf.position_embedding_type
    if kind in NOPE_TYPES:
        return None
    require(kind == "rope", "position_embedding_type", f"{kind!r} is not supported; strata has 'rope', 'nope' and null")
    # Granite's default RoPE rotates every channel whatever partial_rotary_factor says: refuse it.
    fraction = (hf.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    require(fraction == 1, "rope_parameters.partial_rotary_factor", f"{fraction}: Granite rotates whole heads")
    return rope_section(hf, head_dim)


def config_to_strata(hf) -> dict:
    refuse_unless_default(hf, "hidden_act", "silu", "the MLP, expert, conv and gate activation")
    kinds = list(hf.layer_types or ())
    require(len(kinds) == hf.num_hidden_layers, "layer_types",
            f"{len(kinds)} entries for num_hidden_layers {hf.num_hidden_layers}")
    layout = "".join(_symbol(kind, index) for index, kind in enumerate(kinds))
    section = {
        **model_section(hf, layout),
        "embedding_multiplier": float(hf.embedding_multiplier),
        "logits_multiplier": 1 / float(hf.logits_scaling),
        "residual_multiplier": float(hf.residual_multiplier),
        "ffn": _ffn_section(hf),
    }
    if "A" in layout:
        head_dim = head_dim_of(hf)
        section["attention"] = attention_section(hf, _rope(hf, head_dim), softmax_scale=float(hf.attention_multiplier))
    if "M" in layout:
        section["mamba"] = mamba_section(hf, hf.mamba_expand * hf.hidden_size)
    return section


def _swiglu_to_strata(hf, hf_prefix: str, prefix: str):
    """Granite's MLP (``input_linear`` = [gate; up], ``output_linear``) as strata's SwiGLU."""
    gate, up = hf[hf_prefix + "input_linear.weight"].chunk(2)
    yield prefix + "gate.weight", gate
    yield prefix + "up.weight", up
    yield prefix + "down.weight", hf[hf_prefix + "output_linear.weight"]


def _present(hf, hf_prefix: str, names: tuple[str, ...]) -> str:
    """The first of ``names`` the checkpoint holds (the first, to be reported missing, if none)."""
    return next((hf_prefix + name for name in names if hf_prefix + name in hf), hf_prefix + names[0])


def _moe_to_strata(hf, hf_prefix: str, prefix: str):
    yield prefix + "router.weight", hf[_present(hf, hf_prefix, ROUTER_NAMES)]
    gates, ups = hf[_present(hf, hf_prefix, GATE_UP_NAMES)].chunk(2, dim=1)  # [E, 2I, H]: [gate; up] per expert
    downs = hf[_present(hf, hf_prefix, DOWN_NAMES)]  # [E, H, I]
    for expert, (gate, up, down) in enumerate(zip(gates, ups, downs, strict=True)):
        yield from ((f"{prefix}experts.{expert}.{part}.weight", tensor)
                    for part, tensor in (("gate", gate), ("up", up), ("down", down)))


def _layer_pairs(config: ModelConfig, index: int, symbol: str) -> dict[str, str]:
    """strata name -> Granite name for layer ``index``: norms and the Mamba-2 mixer."""
    ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
    pairs = {ours + "mixer_norm.weight": theirs + "input_layernorm.weight",
             ours + "ffn_norm.weight": theirs + "post_attention_layernorm.weight"}
    if symbol == "M":
        pairs |= mamba_pairs(config.mamba, ours + "mixer.", theirs + "mamba.")
    return pairs


def _model_pairs(config: ModelConfig) -> dict[str, str]:
    return model_pairs(config, "model.embed_tokens.weight", "model.norm.weight")


def weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _model_pairs(config))
    for index, symbol in enumerate(config.layout):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        yield from renamed(hf, _layer_pairs(config, index, symbol))
        if symbol == "A":
            yield from attention_to_strata(hf, theirs + "self_attn.", ours + "mixer.", config.attention.bias)
        if config.ffn.kind == "moe":
            yield from _moe_to_strata(hf, theirs + "block_sparse_moe.", ours + "ffn.")
            yield from _swiglu_to_strata(hf, theirs + "shared_mlp.", ours + "ffn.shared.0.")
        else:
            yield from _swiglu_to_strata(hf, theirs + "shared_mlp.", ours + "ffn.")


def exportable(config: ModelConfig) -> str | None:
    if not set(config.layout) <= {"A", "M"}:
        return f"Granite-4.0-H has attention (A) and Mamba-2 (M) blocks; the layout {config.layout} has others"
    ffn = config.ffn
    if ffn.kind == "moe":
        moe = ffn.moe
        if moe.router != "softmax" or moe.n_shared != 1:
            return "Granite's MoE has the softmax router (moe.router softmax) and exactly one shared expert"
    elif ffn.kind != "swiglu" or ffn.bias or ffn.multipliers != (1.0, 1.0):
        return "every Granite block has a SwiGLU FFN without biases or multipliers, or a softmax-routed MoE"
    if "M" in config.layout:
        mamba = config.mamba
        if mamba.norm != "gate_then_norm" or mamba.projection_multipliers is not None:
            return "Granite's Mamba-2 gates before its norm and has no projection multipliers"
        if mamba.width(config.d_model) % config.d_model:
            return "Granite's Mamba-2 width is expand × d_model: mamba.d_ssm must be a multiple of d_model"
    if "A" in config.layout:
        rope = config.attention.rope
        if rope is not None and rope.fraction != 1:
            return "Granite's attention rotates whole heads (rope.fraction 1) or has no RoPE"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    mamba = config.mamba
    attention = config.attention if "A" in config.layout else None
    ffn = config.ffn
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "layer_types": [MAMBA_TYPES[0] if symbol == "M" else ATTENTION_TYPES[0] for symbol in config.layout],
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "embedding_multiplier": config.embedding_multiplier,
        "logits_scaling": 1 / config.logits_multiplier,
        "residual_multiplier": config.residual_multiplier,
        "position_embedding_type": None,
    }
    if ffn.kind == "moe":
        out |= {"num_local_experts": ffn.moe.n_experts, "num_experts_per_tok": ffn.moe.top_k,
                "intermediate_size": ffn.expert_width, "shared_intermediate_size": ffn.shared_width}
    else:
        out |= {"num_local_experts": 0, "intermediate_size": ffn.d_ffn, "shared_intermediate_size": ffn.d_ffn}
    if attention is not None:
        out |= {"num_attention_heads": attention.n_heads, "num_key_value_heads": attention.n_kv_heads,
                "attention_bias": attention.bias,
                "attention_multiplier": attention.softmax_scale or default_softmax_scale(attention.head_dim)}
        if attention.rope is not None:
            out |= {"position_embedding_type": "rope", "rope_parameters": rope_parameters(attention)}
        if attention.head_dim != config.d_model // attention.n_heads:
            out["head_dim"] = attention.head_dim
    if "M" in config.layout:
        d_ssm = mamba.width(config.d_model)
        out |= {"mamba_expand": d_ssm // config.d_model, "mamba_n_heads": d_ssm // mamba.head_dim,
                "mamba_d_head": mamba.head_dim, "mamba_n_groups": mamba.n_groups, "mamba_d_state": mamba.d_state,
                "mamba_d_conv": mamba.conv_kernel, "mamba_chunk_size": mamba.chunk_size,
                "mamba_proj_bias": mamba.bias, "mamba_conv_bias": mamba.conv_bias}
    else:  # transformers checks the (unused) Mamba shape: one head of the default width passes
        out["mamba_n_heads"] = 1
    return out


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _model_pairs(config))
    for index, symbol in enumerate(config.layout):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        out |= inverted(state, _layer_pairs(config, index, symbol))
        if symbol == "A":
            out |= attention_to_hf(state, ours + "mixer.", theirs + "self_attn.", config.attention)
        ffn = ours + "ffn."
        if config.ffn.kind == "moe":
            experts = range(config.ffn.moe.n_experts)
            moe = theirs + "block_sparse_moe."
            out[moe + ROUTER_NAMES[0]] = state[ffn + "router.weight"]
            out[moe + GATE_UP_NAMES[0]] = torch.stack(
                [torch.cat([state[f"{ffn}experts.{e}.gate.weight"], state[f"{ffn}experts.{e}.up.weight"]]) for e in experts])
            out[moe + DOWN_NAMES[0]] = torch.stack([state[f"{ffn}experts.{e}.down.weight"] for e in experts])
            ffn += "shared.0."
        out[theirs + "shared_mlp.input_linear.weight"] = torch.cat([state[ffn + "gate.weight"], state[ffn + "up.weight"]])
        out[theirs + "shared_mlp.output_linear.weight"] = state[ffn + "down.weight"]
    return out


FAMILY = Family("GraniteMoeHybridForCausalLM", "granitemoehybrid", config_to_strata, weights_to_strata, config_to_hf,
                weights_to_hf, exportable)
