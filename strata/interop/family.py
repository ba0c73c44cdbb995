"""What a Hugging Face model family is to strata: how its config and weights map onto a layout.

A ``Family`` holds four translations, each a plain function:
    config_to_strata(hf_config) -> dict     the strata ``model`` section (validated by the caller)
    weights_to_strata(config, hf) -> iter   (strata name, tensor) pairs, reading ``hf[name]`` lazily
    config_to_hf(config) -> dict            keyword arguments of the family's transformers config class
    weights_to_hf(config, state) -> dict    HF names -> tensors
Export is optional (``config_to_hf`` None); ``exportable`` says in one line why a strata config
cannot be written as this family, or returns None.

Every option of an HF config that strata does not implement stops the import with
``UnsupportedCheckpoint`` naming the config key: nothing is approximated silently. The helpers
below map the pieces every family shares (attention, the Mamba-2 mixer, SwiGLU, RoPE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from strata.config import AttentionConfig, ModelConfig

Tensors = Iterator[tuple[str, torch.Tensor]]


class UnsupportedCheckpoint(ValueError):
    """A checkpoint option strata does not implement; ``str()`` names the config key."""


@dataclass(frozen=True)
class Family:
    architecture: str  # the ``architectures`` entry of config.json, e.g. "BambaForCausalLM"
    model_type: str  # config.json's ``model_type``
    config_to_strata: Callable[[Any], dict]
    weights_to_strata: Callable[[ModelConfig, Mapping[str, torch.Tensor]], Tensors]
    config_to_hf: Callable[[ModelConfig], dict] | None = None
    weights_to_hf: Callable[[ModelConfig, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    exportable: Callable[[ModelConfig], str | None] = lambda config: None
    ignored: tuple[str, ...] = ()  # prefixes of checkpoint weights that are not the language model's

    def config_class(self):
        """The transformers config class of this family."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type).__class__


def require(condition: bool, key: str, message: str) -> None:
    """Refuse a checkpoint whose config ``key`` asks for something strata does not implement."""
    if not condition:
        raise UnsupportedCheckpoint(f"key {key!r}: {message}")


def refuse_unless_default(hf, key: str, default, what: str) -> None:
    value = getattr(hf, key, default)
    if isinstance(value, list):  # JSON has no tuples
        value = tuple(value)
    require(value == default or value is None, key, f"{value!r} is not supported ({what}); strata implements {default!r}")


# --- shared config pieces ------------------------------------------------------------------------


def model_section(hf, layout: str, norm_eps: float | None = None, tie: bool | None = None) -> dict:
    """The keys of strata's ``model`` section every family fills alike."""
    return {
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "layout": layout,
        "norm_eps": hf.rms_norm_eps if norm_eps is None else norm_eps,
        "context_length": hf.max_position_embeddings,
        "tie_embeddings": bool(hf.tie_word_embeddings) if tie is None else tie,
    }


def attention_section(hf, rope: dict | None, **settings) -> dict:
    """strata's ``attention`` section from the keys every family names alike (``settings`` adds or
    overrides keys: a softmax scale, value width, bias)."""
    section = {"n_heads": hf.num_attention_heads, "n_kv_heads": hf.num_key_value_heads, "head_dim": head_dim_of(hf),
               "bias": bool(getattr(hf, "attention_bias", False)), "rope": rope}
    return section | settings


def rope_section(hf, head_dim: int, fraction: float = 1.0) -> dict:
    """strata's ``rope`` section from transformers 5's ``rope_parameters`` (default or llama3)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    section: dict[str, Any] = {"theta": float(params.get("rope_theta", 10_000.0)), "fraction": fraction}
    if kind == "llama3":
        section["scaling"] = {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_context": int(params["original_max_position_embeddings"]),
        }
    else:
        require(kind == "default", "rope_parameters.rope_type", f"{kind!r} is not supported; strata has default and llama3")
    require(head_dim * fraction % 2 == 0, "head_dim", f"{head_dim}: RoPE needs an even number of rotated channels")
    return section


def rope_parameters(attention: AttentionConfig) -> dict:
    """transformers 5's ``rope_parameters`` from strata's ``rope`` section (the inverse of ``rope_section``)."""
    rope = attention.rope
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.fraction != 1:
        params["partial_rotary_factor"] = rope.fraction
    if rope.scaling is not None:
        scaling = rope.scaling
        params.update(rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                      high_freq_factor=scaling.high_freq_factor, original_max_position_embeddings=scaling.original_context)
    return params


def head_dim_of(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def default_softmax_scale(head_dim: int) -> float:
    return 1 / math.sqrt(head_dim)


# --- shared weight pieces ------------------------------------------------------------------------


def renamed(hf: Mapping[str, torch.Tensor], pairs: Mapping[str, str]) -> Tensors:
    """(strata name, tensor) for each (strata name -> HF name) pair."""
    for strata_name, hf_name in pairs.items():
        yield strata_name, hf[hf_name]


def attention_to_strata(hf: Mapping[str, torch.Tensor], hf_prefix: str, prefix: str, bias: bool, output: str = "o_proj") -> Tensors:
    """HF's separate q/k/v projections (``hf_prefix`` + q_proj ...) as strata's fused ``qkv_proj``."""
    names = [f"{hf_prefix}{part}_proj" for part in "qkv"]
    yield f"{prefix}qkv_proj.weight", torch.cat([hf[name + ".weight"] for name in names])
    if bias:
        yield f"{prefix}qkv_proj.bias", torch.cat([hf[name + ".bias"] for name in names])
    if output:
        yield from renamed(hf, {f"{prefix}{output}.weight": f"{hf_prefix}o_proj.weight"}
                           | ({f"{prefix}{output}.bias": f"{hf_prefix}o_proj.bias"} if bias else {}))


def attention_to_hf(state: Mapping[str, torch.Tensor], prefix: str, hf_prefix: str, attention: AttentionConfig,
                    output: str | None = "o_proj") -> dict[str, torch.Tensor]:
    """strata's fused ``qkv_proj`` (and output projection ``output``) under HF's names."""
    widths = (attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim,
              attention.n_kv_heads * attention.value_head_dim)
    out = {}
    for kind in ("weight", "bias") if attention.bias else ("weight",):
        for part, tensor in zip("qkv", state[f"{prefix}qkv_proj.{kind}"].split(widths)):
            out[f"{hf_prefix}{part}_proj.{kind}"] = tensor
        if output:
            out[f"{hf_prefix}o_proj.{kind}"] = state[f"{prefix}{output}.{kind}"]
    return out


MAMBA_PARAMETERS = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "out_proj.weight")


def mamba_pairs(mamba, ours: str, theirs: str, norm: bool = True, output: bool = True) -> dict[str, str]:
    """strata name -> HF name of a Mamba-2 mixer's parameters (strata, HF and mamba_ssm name them
    alike), from the mixer prefixes ``ours`` and ``theirs``; without ``output`` the out-projection
    is left to the caller (the hybrid's branch has none of its own)."""
    names = [name for name in MAMBA_PARAMETERS if output or not name.startswith("out_proj")]
    if mamba.bias:
        names += ["in_proj.bias"] + (["out_proj.bias"] if output else [])
    if mamba.conv_bias:
        names.append("conv1d.bias")
    if norm:
        names.append("norm.weight")
    return {ours + name: theirs + name for name in names}


def model_pairs(config: ModelConfig, embedding: str, norm: str, head: str = "lm_head.weight") -> dict[str, str]:
    """strata name -> HF name of the embedding, the final norm and (untied) the head."""
    pairs = {"embed.weight": embedding, "norm.weight": norm}
    if not config.tie_embeddings:
        pairs["head.weight"] = head
    return pairs


def swiglu_names(bias: bool, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> dict[str, str]:
    """strata SwiGLU parameter name -> HF name (relative to the FFN)."""
    pairs = {"gate": gate, "up": up, "down": down}
    kinds = ("weight", "bias") if bias else ("weight",)
    return {f"{ours}.{kind}": f"{theirs}.{kind}" for ours, theirs in pairs.items() for kind in kinds}


def prefixed(pairs: Mapping[str, str], prefix: str, hf_prefix: str) -> dict[str, str]:
    return {prefix + ours: hf_prefix + theirs for ours, theirs in pairs.items()}


def inverted(state: Mapping[str, torch.Tensor], pairs: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The export direction of ``renamed``: HF name -> strata tensor."""
    return {hf_name: state[strata_name] for strata_name, hf_name in pairs.items()}
