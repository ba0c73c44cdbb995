"""Weight exchange with HF transformers' Llama and Mamba2 (requires the optional ``transformers``).

strata's attention blocks are Llama decoder layers and its Mamba-2 mixer is HF's ``Mamba2Mixer``
with the same parameter layout, so a pure-attention strata model exports to ``LlamaForCausalLM``
and a pure-Mamba, FFN-less one to ``Mamba2ForCausalLM`` with outputs equal to fp32 precision.
The peer-equivalence tests and the benchmarks use this to compare like with like.
"""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.models.lm import Block, LanguageModel


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def hf_llama_config(config: ModelConfig):
    """The ``LlamaConfig`` of a strata model made only of ``A`` blocks with SwiGLU FFNs."""
    from transformers import LlamaConfig

    _require(set(config.layout) == {"A"}, f"Llama export needs an all-attention layout, got {config.layout}")
    _require(config.ffn.kind == "swiglu", "Llama export needs ffn.kind=swiglu")
    attention = config.attention
    rope = {"rope_type": "default", "rope_theta": attention.rope.theta}
    if attention.rope.scaling is not None:
        scaling = attention.rope.scaling
        rope.update(
            rope_type="llama3",
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_context,
        )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn.d_ffn,
        num_hidden_layers=config.n_layers,
        num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.n_kv_heads,
        head_dim=attention.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )


def hf_mamba2_config(config: ModelConfig):
    """The HF ``Mamba2Config`` of a strata model made only of ``M`` blocks without FFNs."""
    from transformers import Mamba2Config

    _require(set(config.layout) == {"M"}, f"Mamba2 export needs an all-Mamba layout, got {config.layout}")
    _require(config.ffn.kind == "none", "HF Mamba2 blocks have no FFN: export needs ffn.kind=none")
    mamba = config.mamba
    d_ssm = mamba.width(config.d_model)
    _require(d_ssm % config.d_model == 0, "HF Mamba2 needs d_ssm to be an integer multiple of d_model")
    return Mamba2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        expand=d_ssm // config.d_model,
        num_heads=d_ssm // mamba.head_dim,
        head_dim=mamba.head_dim,
        state_size=mamba.d_state,
        n_groups=mamba.n_groups,
        conv_kernel=mamba.conv_kernel,
        chunk_size=mamba.chunk_size,
        layer_norm_epsilon=config.norm_eps,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        tie_word_embeddings=config.tie_embeddings,
    )


def llama_layer_state_dict(block: Block) -> dict[str, torch.Tensor]:
    """One strata attention block's weights under ``LlamaDecoderLayer`` names."""
    attention, ffn = block.mixer, block.ffn
    q, k, v = attention.qkv_proj.weight.split(attention.qkv_widths)
    return {
        "input_layernorm.weight": block.mixer_norm.weight,
        "post_attention_layernorm.weight": block.ffn_norm.weight,
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": attention.o_proj.weight,
        "mlp.gate_proj.weight": ffn.gate.weight,
        "mlp.up_proj.weight": ffn.up.weight,
        "mlp.down_proj.weight": ffn.down.weight,
    }


def llama_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """strata weights under ``LlamaForCausalLM`` names."""
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        for name, tensor in llama_layer_state_dict(block).items():
            out[f"model.layers.{i}.{name}"] = tensor
    if model.head is not None:
        out["lm_head.weight"] = model.head.weight
    return out


def mamba2_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """strata weights under ``Mamba2ForCausalLM`` names."""
    out = {"backbone.embeddings.weight": model.embed.weight, "backbone.norm_f.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"backbone.layers.{i}."
        out[prefix + "norm.weight"] = block.mixer_norm.weight
        for name, tensor in block.mixer.state_dict().items():
            out[prefix + "mixer." + name] = tensor
    if model.head is not None:
        out["lm_head.weight"] = model.head.weight
    return out


def _export(hf_model, state: dict[str, torch.Tensor]):
    expected = set(hf_model.state_dict())
    missing = expected - set(state) - ({"lm_head.weight"} if hf_model.config.tie_word_embeddings else set())
    _require(not missing, f"no strata weight for {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            if name in state:
                tensor.copy_(state[name])
    if hf_model.config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model


def to_hf_llama(model: LanguageModel):
    """A ``LlamaForCausalLM`` computing the same function as ``model`` (weights copied)."""
    from transformers import LlamaForCausalLM

    hf_config = hf_llama_config(model.config)
    hf_config._attn_implementation = "sdpa"
    return _export(LlamaForCausalLM(hf_config), llama_state_dict(model))


def to_hf_mamba2(model: LanguageModel):
    """A ``Mamba2ForCausalLM`` computing the same function as ``model`` (weights copied)."""
    from transformers import Mamba2ForCausalLM

    return _export(Mamba2ForCausalLM(hf_mamba2_config(model.config)), mamba2_state_dict(model))
