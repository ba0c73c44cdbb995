"""NVIDIA's Nemotron-H (``NemotronHForCausalLM``): blocks of one sublayer each, Mamba-2, attention or MLP.

Every Nemotron-H layer is ``x + mixer(norm(x))`` with one mixer, named by ``layers_block_type``
(the legacy ``hybrid_override_pattern`` spells it ``M``, ``*``, ``-``, ``E``): a Mamba-2 layer is
a strata ``M`` block, an attention layer an ``A`` block and an MLP layer an ``F`` block. A layout
with ``F`` blocks gives the others no FFN, so the layer's ``norm`` is an ``M`` or ``A`` block's
``mixer_norm`` and an ``F`` block's ``ffn_norm``; a model without MLP layers has ``ffn.kind`` none.
The attention has no positional encoding (strata's ``rope: null``), the MLP is the squared-ReLU
``up`` then ``down`` (``ffn.kind`` relu2).

Checkpoints name the model ``backbone.`` (NVIDIA's and what ``save_pretrained`` writes); in
memory transformers 5 calls it ``model.``. Both are read; ``backbone.`` is written.

transformers 5 builds neither attention biases nor a tied head, whatever ``attention_bias`` and
``tie_word_embeddings`` say, while NVIDIA's own code honours both. The checkpoint decides: an
attention bias it holds is used and one it lacks is zero; ``lm_head.weight`` is the head when it
is there, the embedding otherwise (so the strata head is never tied). Export writes the head out
(``tie_word_embeddings`` false) and refuses attention biases, which transformers would drop.
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.interop.family import (
    Family,
    attention_to_hf,
    attention_section,
    attention_to_strata,
    model_section,
    inverted,
    mamba_pairs,
    refuse_unless_default,
    renamed,
    require,
)

# ``layers_block_type`` entry -> strata symbol; transformers maps the legacy names ("mamba",
# "attention") to the new ones when it reads a config, strata accepts either.
SYMBOLS = {"linear_attention": "M", "mamba": "M", "full_attention": "A", "attention": "A", "mlp": "F"}
LAYER_TYPES = {"M": "linear_attention", "A": "full_attention", "F": "mlp"}
HUB_PREFIX = "backbone."  # NVIDIA's checkpoints and save_pretrained's
MEMORY_PREFIX = "model."  # transformers 5's module names, which a checkpoint may also carry
NO_STEP_LIMIT = (0.0, float("inf"))

# Keys that change nothing strata computes, and why:
#   residual_in_fp32      NVIDIA's code keeps the residual stream in float32; in float32 (strata's
#                         CPU default, and the tests) that cast is the identity, and in bf16 it only
#                         rounds the stream differently (transformers 5 ignores the key too)
#   rescale_prenorm_residual, initializer_range, time_step_min/max/floor: initialisation only
#   expand, mamba_proj_bias: read by neither transformers nor NVIDIA's code (the Mamba-2 width is
#                         mamba_num_heads × mamba_head_dim; use_bias sets the projection biases)
#   attention_dropout, hidden_dropout: training only; num_logits_to_keep, use_cache,
#   use_mamba_kernels, mamba_ssm_cache_dtype: how generation runs, not what it computes
#   the moe_* / n_routed_experts / router keys apply to MoE layers, mtp_layers_block_type to MTP
#                         layers: both refused below


def layout_of(hf) -> str:
    """The strata layout of ``layers_block_type``; MoE layers are refused."""
    types = list(hf.layers_block_type or ())
    require("moe" not in types, "layers_block_type",
            "MoE layers ('moe', 'E') are not supported: strata's MoE is not Nemotron-H's grouped sigmoid router")
    unknown = sorted(set(types) - set(SYMBOLS))
    require(not unknown, "layers_block_type", f"{unknown} are not Nemotron-H layer types strata knows")
    return "".join(SYMBOLS[kind] for kind in types)


def config_to_strata(hf) -> dict:
    layout = layout_of(hf)
    require(not getattr(hf, "num_nextn_predict_layers", 0), "num_nextn_predict_layers",
            f"{hf.num_nextn_predict_layers}: multi-token prediction (MTP) layers are not supported")
    require(getattr(hf, "sliding_window", None) is None, "sliding_window",
            f"{hf.sliding_window}: Nemotron-H's windowed attention is not supported (strata's W blocks have RoPE and sinks)")
    section = {
        # transformers 5 never ties Nemotron-H's head; the weights decide (module docstring)
        **model_section(hf, layout, norm_eps=hf.layer_norm_epsilon, tie=False),
        "ffn": {"kind": "none"},
    }
    if "A" in layout:
        section["attention"] = attention_section(hf, None)
    if "M" in layout:
        limit = tuple(hf.time_step_limit) if hf.time_step_limit is not None else NO_STEP_LIMIT
        require(limit == NO_STEP_LIMIT, "time_step_limit",
                f"{list(limit)} is not supported (a clamped step size); strata implements {list(NO_STEP_LIMIT)}")
        refuse_unless_default(hf, "mamba_hidden_act", "silu", "the conv and gate activation")
        section["mamba"] = {
            "d_ssm": hf.mamba_num_heads * hf.mamba_head_dim,
            "d_state": hf.ssm_state_size,
            "head_dim": hf.mamba_head_dim,
            "n_groups": hf.n_groups,
            "conv_kernel": hf.conv_kernel,
            "chunk_size": hf.chunk_size,
            "bias": bool(hf.use_bias),
            "conv_bias": bool(hf.use_conv_bias),
        }
    if "F" in layout:
        refuse_unless_default(hf, "mlp_hidden_act", "relu2", "the MLP activation")
        section["ffn"] = {"kind": "relu2", "d_ffn": hf.intermediate_size, "bias": bool(hf.mlp_bias)}
    return section


def _layer_pairs(config: ModelConfig, index: int, symbol: str, prefix: str) -> dict[str, str]:
    """strata name -> Nemotron-H name for layer ``index``, its attention aside."""
    ours, theirs = f"blocks.{index}.", f"{prefix}layers.{index}."
    if symbol == "F":
        kinds = ("weight", "bias") if config.ffn.bias else ("weight",)
        pairs = {ours + "ffn_norm.weight": theirs + "norm.weight"}
        return pairs | {f"{ours}ffn.{part}.{kind}": f"{theirs}mixer.{part}_proj.{kind}"
                        for part in ("up", "down") for kind in kinds}
    pairs = {ours + "mixer_norm.weight": theirs + "norm.weight"}
    if symbol == "M":
        pairs |= mamba_pairs(config.mamba, ours + "mixer.", theirs + "mixer.")
    return pairs


def _model_pairs(prefix: str) -> dict[str, str]:
    return {"embed.weight": f"{prefix}embeddings.weight", "norm.weight": f"{prefix}norm_f.weight"}


def _attention_to_strata(config: ModelConfig, hf, hf_prefix: str, prefix: str):
    """The attention's weights; a bias the checkpoint lacks (transformers 5 builds none) is zero."""
    yield from attention_to_strata(hf, hf_prefix, prefix, bias=False)
    if config.attention.bias:
        first = hf_prefix + "q_proj.bias"
        if first in hf:
            yield prefix + "qkv_proj.bias", torch.cat([hf[f"{hf_prefix}{part}_proj.bias"] for part in "qkv"])
            yield prefix + "o_proj.bias", hf[hf_prefix + "o_proj.bias"]
        else:
            attention = config.attention
            width = (attention.n_heads + 2 * attention.n_kv_heads) * attention.head_dim
            yield prefix + "qkv_proj.bias", torch.zeros(width)
            yield prefix + "o_proj.bias", torch.zeros(config.d_model)


def weights_to_strata(config: ModelConfig, hf):
    prefix = MEMORY_PREFIX if MEMORY_PREFIX + "embeddings.weight" in hf else HUB_PREFIX
    yield from renamed(hf, _model_pairs(prefix))
    yield "head.weight", hf["lm_head.weight" if "lm_head.weight" in hf else prefix + "embeddings.weight"]
    for index, symbol in enumerate(config.layout):
        yield from renamed(hf, _layer_pairs(config, index, symbol, prefix))
        if symbol == "A":
            yield from _attention_to_strata(config, hf, f"{prefix}layers.{index}.mixer.", f"blocks.{index}.mixer.")


def exportable(config: ModelConfig) -> str | None:
    if not set(config.layout) <= {"A", "M", "F"}:
        return f"Nemotron-H has attention (A), Mamba-2 (M) and MLP (F) blocks; the layout {config.layout} has others"
    if "A" not in config.layout:
        # transformers 5.25 builds the attention mask from its cache's attention layers and fails without one
        return "transformers' Nemotron-H cannot run with a cache unless the layout has an attention (A) block"
    if config.ffn.kind != ("relu2" if "F" in config.layout else "none"):
        return ("every Nemotron-H block holds one sublayer: its FFNs are F blocks of ffn.kind relu2, "
                "and a layout without F blocks has ffn.kind none")
    if "M" in config.layout:
        mamba = config.mamba
        if mamba.norm != "gate_then_norm" or mamba.projection_multipliers is not None:
            return "Nemotron-H's Mamba-2 gates before its norm and has no projection multipliers"
    if "A" in config.layout:
        attention = config.attention
        if attention.rope is not None or attention.softmax_scale is not None:
            return "Nemotron-H's attention has no positional encoding (rope null) and the 1/sqrt(head_dim) softmax scale"
        if attention.bias:
            return "transformers' Nemotron-H attention has no biases (it ignores attention_bias)"
    if (config.embedding_multiplier, config.logits_multiplier, config.residual_multiplier) != (1, 1, 1):
        return "Nemotron-H has no embedding, logits or residual multipliers"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "layers_block_type": [LAYER_TYPES[symbol] for symbol in config.layout],
        "layer_norm_epsilon": config.norm_eps,
        "max_position_embeddings": config.context_length,
        # transformers 5 never ties Nemotron-H's head: a tied strata model writes its head out
        "tie_word_embeddings": False,
    }
    if "F" in config.layout:
        out |= {"intermediate_size": config.ffn.d_ffn, "mlp_bias": config.ffn.bias, "mlp_hidden_act": "relu2"}
    if "A" in config.layout:
        attention = config.attention
        out |= {"num_attention_heads": attention.n_heads, "num_key_value_heads": attention.n_kv_heads,
                "head_dim": attention.head_dim, "attention_bias": False}
    if "M" in config.layout:
        mamba = config.mamba
        out |= {"mamba_num_heads": mamba.n_heads(config.d_model), "mamba_head_dim": mamba.head_dim,
                "ssm_state_size": mamba.d_state, "n_groups": mamba.n_groups, "conv_kernel": mamba.conv_kernel,
                "chunk_size": mamba.chunk_size, "use_bias": mamba.bias, "use_conv_bias": mamba.conv_bias,
                "mamba_hidden_act": "silu"}
    return out


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _model_pairs(HUB_PREFIX))
    out["lm_head.weight"] = state["embed.weight" if config.tie_embeddings else "head.weight"]
    for index, symbol in enumerate(config.layout):
        out |= inverted(state, _layer_pairs(config, index, symbol, HUB_PREFIX))
        if symbol == "A":
            out |= attention_to_hf(state, f"blocks.{index}.mixer.", f"{HUB_PREFIX}layers.{index}.mixer.", config.attention)
    return out


FAMILY = Family("NemotronHForCausalLM", "nemotron_h", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf,
                exportable)
