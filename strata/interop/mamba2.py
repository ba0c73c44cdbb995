"""Mamba-2 language models: HF's ``Mamba2ForCausalLM`` and the original mamba_ssm layout.

Both are strata's all-``M`` layout without FFNs; the mixer's parameters have the same names and
shapes in all three. mamba_ssm directories (``config.json`` with ``d_model``, ``n_layer`` and
``ssm_cfg``, as state-spaces/mamba2-130m ships) are read with mamba_ssm's own defaults, including
its padding of the vocabulary to a multiple of ``pad_vocab_size_multiple``.
"""

from __future__ import annotations

from types import SimpleNamespace

from strata.config import ModelConfig
from strata.interop.family import Family, inverted, mamba_pairs, model_pairs, refuse_unless_default, renamed, require


def config_to_strata(hf) -> dict:
    refuse_unless_default(hf, "time_step_limit", (0.0, float("inf")), "a clamped step size")
    refuse_unless_default(hf, "hidden_act", "silu", "the conv and gate activation")
    d_ssm = hf.expand * hf.hidden_size
    require(d_ssm == hf.num_heads * hf.head_dim, "num_heads", f"{hf.num_heads} heads of {hf.head_dim} are not expand × hidden_size")
    return {
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "layout": "M" * hf.num_hidden_layers,
        "norm_eps": hf.layer_norm_epsilon,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "mamba": {"d_ssm": d_ssm, "d_state": hf.state_size, "head_dim": hf.head_dim, "n_groups": hf.n_groups,
                  "conv_kernel": hf.conv_kernel, "chunk_size": hf.chunk_size, "bias": bool(hf.use_bias),
                  "conv_bias": bool(hf.use_conv_bias)},
        "ffn": {"kind": "none"},
    }


def _pairs(config: ModelConfig, prefix: str = "backbone.", embedding: str = "embeddings") -> dict[str, str]:
    pairs = model_pairs(config, f"{prefix}{embedding}.weight", f"{prefix}norm_f.weight")
    for index in range(config.n_layers):
        ours, theirs = f"blocks.{index}.", f"{prefix}layers.{index}."
        pairs[ours + "mixer_norm.weight"] = theirs + "norm.weight"
        pairs |= mamba_pairs(config.mamba, ours + "mixer.", theirs + "mixer.")
    return pairs


def weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _pairs(config))


def exportable(config: ModelConfig) -> str | None:
    if set(config.layout) != {"M"}:
        return f"Mamba2 is all Mamba-2 blocks; the layout {config.layout} is not"
    if config.ffn.kind != "none":
        return "Mamba2's blocks have no FFN (ffn.kind none)"
    mamba = config.mamba
    if mamba.width(config.d_model) % config.d_model:
        return "Mamba2's width is expand × d_model: mamba.d_ssm must be a multiple of d_model"
    if mamba.norm != "gate_then_norm" or mamba.projection_multipliers is not None:
        return "Mamba2 gates before its norm and has no projection multipliers"
    if (config.embedding_multiplier, config.logits_multiplier, config.residual_multiplier) != (1, 1, 1):
        return "Mamba2 has no embedding, logits or residual multipliers"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    mamba = config.mamba
    d_ssm = mamba.width(config.d_model)
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "expand": d_ssm // config.d_model,
        "num_heads": d_ssm // mamba.head_dim,
        "head_dim": mamba.head_dim,
        "state_size": mamba.d_state,
        "n_groups": mamba.n_groups,
        "conv_kernel": mamba.conv_kernel,
        "chunk_size": mamba.chunk_size,
        "layer_norm_epsilon": config.norm_eps,
        "use_bias": mamba.bias,
        "use_conv_bias": mamba.conv_bias,
        "tie_word_embeddings": config.tie_embeddings,
    }


def weights_to_hf(config: ModelConfig, state) -> dict:
    return inverted(state, _pairs(config))


FAMILY = Family("Mamba2ForCausalLM", "mamba2", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf, exportable)


# --- the mamba_ssm layout ------------------------------------------------------------------------

# mamba_ssm's MambaConfig and Mamba2 layer defaults (mamba_ssm/models/config_mamba.py, modules/mamba2.py).
MAMBA_SSM_DEFAULTS = {"d_intermediate": 0, "vocab_size": 50277, "attn_layer_idx": [], "rms_norm": True,
                      "residual_in_fp32": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
MAMBA2_LAYER_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
                         "rmsnorm": True, "norm_before_gate": False, "bias": False, "conv_bias": True,
                         "D_has_hdim": False, "dt_limit": (0.0, float("inf"))}


def read_mamba_ssm_config(raw: dict) -> SimpleNamespace:
    """A mamba_ssm config.json with mamba_ssm's defaults filled in; the layer settings under ``ssm``."""
    config = {**MAMBA_SSM_DEFAULTS, **raw}
    layer = {**MAMBA2_LAYER_DEFAULTS, **(config.get("ssm_cfg") or {})}
    return SimpleNamespace(**config, ssm=SimpleNamespace(**layer))


def mamba_ssm_to_strata(raw: SimpleNamespace) -> dict:
    ssm = raw.ssm
    require(getattr(ssm, "layer", "Mamba1") == "Mamba2", "ssm_cfg.layer", f"{getattr(ssm, 'layer', 'Mamba1')!r}: strata has Mamba-2 layers")
    require(not raw.attn_layer_idx, "attn_layer_idx", "mamba_ssm's attention layers are not supported")
    require(raw.d_intermediate == 0, "d_intermediate", "mamba_ssm's MLP blocks are not supported")
    require(raw.rms_norm, "rms_norm", "mamba_ssm's LayerNorm variant is not supported; strata has RMSNorm")
    for key, default in (("rmsnorm", True), ("norm_before_gate", False), ("D_has_hdim", False), ("dt_limit", (0.0, float("inf")))):
        value = getattr(ssm, key)
        require(tuple(value) == default if isinstance(default, tuple) else value == default, f"ssm_cfg.{key}",
                f"{value!r} is not supported; strata implements {default!r}")
    multiple = raw.pad_vocab_size_multiple
    vocab = raw.vocab_size + (-raw.vocab_size) % multiple
    return {
        "vocab_size": vocab,
        "d_model": raw.d_model,
        "layout": "M" * raw.n_layer,
        "tie_embeddings": bool(raw.tie_embeddings),
        "mamba": {"expand": ssm.expand, "d_state": ssm.d_state, "head_dim": ssm.headdim, "n_groups": ssm.ngroups,
                  "conv_kernel": ssm.d_conv, "chunk_size": ssm.chunk_size, "bias": bool(ssm.bias),
                  "conv_bias": bool(ssm.conv_bias)},
        "ffn": {"kind": "none"},
    }


def mamba_ssm_weights_to_strata(config: ModelConfig, hf):
    yield from renamed(hf, _pairs(config, embedding="embedding"))


MAMBA_SSM = Family("mamba_ssm", "mamba_ssm", mamba_ssm_to_strata, mamba_ssm_weights_to_strata)
