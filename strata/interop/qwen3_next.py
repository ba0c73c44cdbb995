"""Qwen's Qwen3-Next (``Qwen3NextForCausalLM``) and Qwen3.5 (``Qwen3_5ForCausalLM``,
``Qwen3_5MoeForCausalLM``, and the language model of their ``...ForConditionalGeneration``
checkpoints, as they are published): inter-layer hybrids of Gated DeltaNet and gated attention
blocks, each with a sparse MoE or a dense SwiGLU FFN.

Every layer is a strata block: ``G`` where ``layer_types`` says linear_attention, ``A`` where it
says full_attention. Their pieces are strata options:
  attention   ``output_gate`` (q_proj makes, per head, the query then its gate; strata keeps the
              gates after V in ``qkv_proj``), ``qk_norm: head`` (q_norm/k_norm over head_dim) and
              partial RoPE (``partial_rotary_factor``, 0.25 by default, is ``rope.fraction``)
  Gated DeltaNet  ``in_proj_qkvz`` holds, per key head h, [q_h, k_h, v_h, z_h] with the values
              and gates of h's value heads, and ``in_proj_ba`` [b_h, a_h]; strata's ``in_proj`` is
              [q, k, v, z, b, a], each over all heads: rows are regrouped on import and export
  MoE         the softmax router (``norm_topk_prob`` true is ``softmax_over: chosen``, false
              ``all``), one shared expert gated by sigmoid(shared_expert_gate(x)) (``shared_gate``)
Qwen3-Next's RMSNorms (not the Gated DeltaNet's gated one) are zero-centred: they apply (1 + w) and
store w, so strata's weight is the stored one plus one.

Qwen3.5's text model is Qwen3-Next's with two differences: its Gated DeltaNet projects
``in_proj_qkv`` ([q; k; v] over all heads), ``in_proj_z``, ``in_proj_b`` and ``in_proj_a``
separately, which strata's ``in_proj`` concatenates as they are, and its FFNs are all dense (or,
in Qwen3.5-MoE, all Qwen3-Next's MoE with the top-k weights renormalised). Its RoPE
is Qwen3-VL's multimodal one (``mrope_section``); for text every position is the same on its
three axes, which is plain (partial) RoPE. The vision tower of a ``Qwen3_5ForConditionalGeneration``
checkpoint is left unread: strata imports the language model. A strata model exports as Qwen3-Next,
which expresses every Qwen3.5 text model.

Expert weights come under the per-expert names checkpoints hold and save_pretrained writes
(``mlp.experts.{e}.gate_proj.weight``) or transformers 5's in-memory fused ones
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``); import reads either, export
writes the first. Layers that are dense where others are sparse (``mlp_only_layers``,
``decoder_sparse_step``) are refused: a strata stack has one kind of FFN.

Left unmapped because they change nothing at inference: ``attention_dropout``,
``output_router_logits`` and ``router_aux_loss_coef`` (training only), ``initializer_range``,
``use_cache`` and the special token ids.
"""

from __future__ import annotations

import functools

import torch

from strata.config import ModelConfig
from strata.interop.family import (
    Family,
    attention_section,
    model_pairs,
    model_section,
    inverted,
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
DEFAULT_ROPE_FRACTION = 0.25  # what transformers assumes when partial_rotary_factor is not given
# Expert weights relative to ``mlp.experts.``: per expert (checkpoints) or fused (transformers 5's modules).
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
FUSED_GATE_UP, FUSED_DOWN = "gate_up_proj", "down_proj"
SPLIT_PROJECTIONS = ("qkv", "z", "b", "a")  # Qwen3.5's Gated DeltaNet inputs, in strata's in_proj order


# --- config --------------------------------------------------------------------------------------


def _layout(hf) -> str:
    kinds = list(hf.layer_types or ())
    require(len(kinds) == hf.num_hidden_layers, "layer_types", f"{len(kinds)} entries for num_hidden_layers {hf.num_hidden_layers}")
    unknown = sorted(set(kinds) - set(SYMBOLS))
    require(not unknown, "layer_types", f"{unknown} are not supported; strata has {', '.join(SYMBOLS)}")
    return "".join(SYMBOLS[kind] for kind in kinds)


def _sparse_layers(hf) -> list[bool]:
    """Which layers have the sparse MoE block (transformers' rule), the others a dense MLP."""
    dense = set(hf.mlp_only_layers or ())
    return [i not in dense and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
            for i in range(hf.num_hidden_layers)]


def _ffn_section(hf) -> dict:
    """Qwen3-Next's FFNs: sparse MoE where transformers' rule says, else dense; one kind a stack."""
    sparse = _sparse_layers(hf)
    if not any(sparse):
        return _dense_ffn(hf)
    if not all(sparse):
        key = "mlp_only_layers" if hf.mlp_only_layers else "decoder_sparse_step"
        dense = [i for i, is_sparse in enumerate(sparse) if not is_sparse]
        require(False, key, f"makes layers {dense} dense among sparse MoE ones; a strata stack has one kind of FFN")
    return _moe_ffn(hf, renormalised=hf.norm_topk_prob)


def _dense_ffn(hf) -> dict:
    return {"kind": "swiglu", "d_ffn": hf.intermediate_size}


def _moe_ffn(hf, renormalised: bool = True) -> dict:
    """The sparse MoE block: softmax router (its top-k weights renormalised, or not), one shared
    expert with a sigmoid gate. Qwen3.5-MoE's every layer, always renormalised."""
    require(hf.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size",
            f"{hf.shared_expert_intermediate_size}: strata needs the shared expert (a width above 0)")
    moe = {"router": "softmax", "softmax_over": "chosen" if renormalised else "all", "n_experts": hf.num_experts,
           "top_k": hf.num_experts_per_tok, "n_shared": 1, "shared_gate": True, "d_expert": hf.moe_intermediate_size,
           "d_shared": hf.shared_expert_intermediate_size}
    return {"kind": "moe", "d_ffn": 2 * hf.moe_intermediate_size, "moe": moe}


def config_to_strata(hf, ffn_section=_ffn_section, tie: bool | None = None) -> dict:
    """``ffn_section``: the family's FFN rule (Qwen3.5's are ``_dense_ffn`` and ``_moe_ffn``);
    ``tie``: tied embeddings as a multimodal checkpoint's outer config says (default: ``hf``'s)."""
    refuse_unless_default(hf, "hidden_act", "silu", "the MLP, expert and conv activation")
    layout = _layout(hf)
    section = {**model_section(hf, layout, tie=tie), "ffn": ffn_section(hf)}
    if "A" in layout:
        fraction = (hf.rope_parameters or {}).get("partial_rotary_factor", DEFAULT_ROPE_FRACTION)
        rope = rope_section(hf, hf.head_dim, fraction)
        section["attention"] = attention_section(hf, rope, head_dim=hf.head_dim, output_gate=True, qk_norm="head")
    if "G" in layout:
        section["gdn"] = {
            "n_heads": hf.linear_num_key_heads,
            "n_v_heads": hf.linear_num_value_heads,
            "head_dim": hf.linear_key_head_dim,
            "v_head_dim": hf.linear_value_head_dim,
            "conv_kernel": hf.linear_conv_kernel_dim,
            "a_init_range": (0.01, 16.0),  # transformers' initialisation of A (A_log is its log)
        }
    return section


# --- weights -------------------------------------------------------------------------------------


def _centred(tensor: torch.Tensor) -> torch.Tensor:
    """A zero-centred RMSNorm's stored weight w as the weight it applies, 1 + w."""
    return tensor + 1


def _uncentred(tensor: torch.Tensor) -> torch.Tensor:
    return tensor - 1


def _norm_pairs(index: int, symbol: str) -> dict[str, str]:
    """strata name -> Qwen3-Next name of layer ``index``'s zero-centred norms."""
    ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
    pairs = {ours + "mixer_norm.weight": theirs + "input_layernorm.weight",
             ours + "ffn_norm.weight": theirs + "post_attention_layernorm.weight"}
    if symbol == "A":
        pairs |= {ours + "mixer.q_norm.weight": theirs + "self_attn.q_norm.weight",
                  ours + "mixer.k_norm.weight": theirs + "self_attn.k_norm.weight"}
    return pairs


def _plain_pairs(config: ModelConfig, index: int, symbol: str) -> dict[str, str]:
    """strata name -> Qwen3-Next name of layer ``index``'s weights that map one to one."""
    ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
    pairs = {}
    if symbol == "A":
        kinds = ("weight", "bias") if config.attention.bias else ("weight",)
        pairs |= {f"{ours}mixer.o_proj.{kind}": f"{theirs}self_attn.o_proj.{kind}" for kind in kinds}
    else:
        names = ("conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight")
        pairs |= {f"{ours}mixer.{name}": f"{theirs}linear_attn.{name}" for name in names}
    if config.ffn.kind == "moe":
        pairs |= {ours + "ffn.router.weight": theirs + "mlp.gate.weight",
                  ours + "ffn.shared_gate.weight": theirs + "mlp.shared_expert_gate.weight"}
        pairs |= prefixed(swiglu_names(False), ours + "ffn.shared.0.", theirs + "mlp.shared_expert.")
    else:
        pairs |= prefixed(swiglu_names(False), ours + "ffn.", theirs + "mlp.")
    return pairs


def _model_pairs(config: ModelConfig) -> dict[str, str]:
    pairs = model_pairs(config, "model.embed_tokens.weight", "model.norm.weight")
    del pairs["norm.weight"]  # zero-centred
    return pairs


def _qkv_to_strata(config: ModelConfig, hf, theirs: str, kind: str) -> torch.Tensor:
    """q_proj's per-head [query; gate] rows, k_proj and v_proj as strata's [q; k; v; gate]."""
    heads, head_dim = config.attention.n_heads, config.attention.head_dim
    query, gate = hf[f"{theirs}q_proj.{kind}"].unflatten(0, (heads, 2, head_dim)).unbind(1)
    return torch.cat([query.flatten(0, 1), hf[f"{theirs}k_proj.{kind}"], hf[f"{theirs}v_proj.{kind}"], gate.flatten(0, 1)])


def _qkv_to_hf(config: ModelConfig, state, ours: str, theirs: str, kind: str) -> dict[str, torch.Tensor]:
    attention = config.attention
    heads, head_dim = attention.n_heads, attention.head_dim
    widths = (heads * head_dim, attention.n_kv_heads * head_dim, attention.n_kv_heads * head_dim, heads * head_dim)
    query, key, value, gate = state[f"{ours}qkv_proj.{kind}"].split(widths)
    interleaved = torch.stack([query.unflatten(0, (heads, head_dim)), gate.unflatten(0, (heads, head_dim))], dim=1)
    return {f"{theirs}q_proj.{kind}": interleaved.flatten(0, 2), f"{theirs}k_proj.{kind}": key,
            f"{theirs}v_proj.{kind}": value}


def _gdn_groups(config: ModelConfig) -> tuple[list[int], list[int]]:
    """Rows per key head of ``in_proj_qkvz`` (q, k, v, z) and ``in_proj_ba`` (b, a)."""
    gdn = config.gdn
    per_key_head = gdn.n_v_heads // gdn.n_heads
    return [gdn.head_dim, gdn.head_dim, per_key_head * gdn.v_head_dim, per_key_head * gdn.v_head_dim], [per_key_head] * 2


def _in_proj_to_strata(config: ModelConfig, qkvz: torch.Tensor, ba: torch.Tensor) -> torch.Tensor:
    """Per key head [q_h, k_h, v_h, z_h] and [b_h, a_h] as [q, k, v, z, b, a] over all heads."""
    qkvz_rows, ba_rows = _gdn_groups(config)
    key_heads = config.gdn.n_heads
    parts = [part.flatten(0, 1) for part in qkvz.unflatten(0, (key_heads, -1)).split(qkvz_rows, dim=1)]
    parts += [part.flatten(0, 1) for part in ba.unflatten(0, (key_heads, -1)).split(ba_rows, dim=1)]
    return torch.cat(parts)


def _in_proj_to_hf(config: ModelConfig, in_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gdn = config.gdn
    qkvz_rows, ba_rows = _gdn_groups(config)
    widths = [gdn.n_heads * rows for rows in qkvz_rows + ba_rows]
    by_key_head = [part.unflatten(0, (gdn.n_heads, -1)) for part in in_proj.split(widths)]
    return torch.cat(by_key_head[:4], dim=1).flatten(0, 1), torch.cat(by_key_head[4:], dim=1).flatten(0, 1)


def _experts_to_strata(config: ModelConfig, hf, theirs: str, ours: str):
    experts = range(config.ffn.moe.n_experts)
    if theirs + FUSED_GATE_UP in hf:
        gates, ups = hf[theirs + FUSED_GATE_UP].chunk(2, dim=1)  # [E, 2I, H]: [gate; up] per expert
        downs = hf[theirs + FUSED_DOWN]
        for expert, (gate, up, down) in enumerate(zip(gates, ups, downs, strict=True)):
            yield from ((f"{ours}{expert}.{part}.weight", tensor) for part, tensor in (("gate", gate), ("up", up), ("down", down)))
        return
    for expert in experts:
        for part, name in zip(("gate", "up", "down"), EXPERT_NAMES):
            yield f"{ours}{expert}.{part}.weight", hf[f"{theirs}{expert}.{name}.weight"]


def weights_to_strata(config: ModelConfig, hf, split_projections: bool = False):
    """``split_projections``: Qwen3.5's Gated DeltaNet projections (module docstring)."""
    yield from renamed(hf, _model_pairs(config))
    yield "norm.weight", _centred(hf["model.norm.weight"])
    for index, symbol in enumerate(config.layout):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        for strata_name, hf_name in _norm_pairs(index, symbol).items():
            yield strata_name, _centred(hf[hf_name])
        yield from renamed(hf, _plain_pairs(config, index, symbol))
        if symbol == "A":
            for kind in ("weight", "bias") if config.attention.bias else ("weight",):
                yield f"{ours}mixer.qkv_proj.{kind}", _qkv_to_strata(config, hf, theirs + "self_attn.", kind)
        else:
            attn = theirs + "linear_attn."
            if split_projections:
                yield ours + "mixer.in_proj.weight", torch.cat([hf[f"{attn}in_proj_{part}.weight"] for part in SPLIT_PROJECTIONS])
            else:
                yield ours + "mixer.in_proj.weight", _in_proj_to_strata(config, hf[attn + "in_proj_qkvz.weight"],
                                                                        hf[attn + "in_proj_ba.weight"])
        if config.ffn.kind == "moe":
            yield from _experts_to_strata(config, hf, theirs + "mlp.experts.", ours + "ffn.experts.")


# --- export --------------------------------------------------------------------------------------


def exportable(config: ModelConfig) -> str | None:
    if not set(config.layout) <= {"A", "G"}:
        return f"Qwen3-Next has attention (A) and Gated DeltaNet (G) blocks; the layout {config.layout} has others"
    if set(config.post_norm) & set(config.layout):
        return "Qwen3-Next's blocks normalise their inputs (post_norm empty)"
    ffn = config.ffn
    if ffn.kind == "moe":
        moe = ffn.moe
        if moe.router != "softmax" or moe.n_shared != 1 or not moe.shared_gate:
            return "Qwen3-Next's MoE has the softmax router and one shared expert with a gate (moe.shared_gate)"
    elif ffn.kind != "swiglu" or ffn.bias or ffn.multipliers != (1.0, 1.0):
        return "every Qwen3-Next block has a SwiGLU FFN without biases or multipliers, or a softmax-routed MoE"
    if "A" in config.layout:
        attention = config.attention
        if not attention.output_gate or attention.qk_norm != "head":
            return "Qwen3-Next's attention is gated (attention.output_gate) and normalises each Q/K head (qk_norm head)"
        if attention.rope is None or attention.softmax_scale is not None:
            return "Qwen3-Next's attention has RoPE and the 1/sqrt(head_dim) softmax scale"
    if "G" in config.layout:
        gdn = config.gdn
        if gdn.conv_bias or gdn.allow_neg_eigval or gdn.norm_eps not in (None, config.norm_eps):
            return ("Qwen3-Next's Gated DeltaNet has no conv bias, β in (0, 1) and the model's norm_eps in its norm "
                    "(gdn.conv_bias false, allow_neg_eigval false, norm_eps unset)")
    if (config.embedding_multiplier, config.logits_multiplier, config.residual_multiplier) != (1, 1, 1):
        return "Qwen3-Next has no embedding, logits or residual multipliers"
    return None


def config_to_hf(config: ModelConfig) -> dict:
    ffn = config.ffn
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "layer_types": [LAYER_TYPES[symbol] for symbol in config.layout],
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    if ffn.kind == "moe":
        moe = ffn.moe
        out |= {"num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.softmax_over == "chosen",
                "moe_intermediate_size": ffn.expert_width, "shared_expert_intermediate_size": ffn.shared_width}
    else:
        out |= {"num_experts": 0, "intermediate_size": ffn.d_ffn}
    if "A" in config.layout:
        attention = config.attention
        out |= {"num_attention_heads": attention.n_heads, "num_key_value_heads": attention.n_kv_heads,
                "head_dim": attention.head_dim, "attention_bias": attention.bias,
                "rope_parameters": rope_parameters(attention) | {"partial_rotary_factor": attention.rope.fraction}}
    if "G" in config.layout:
        gdn = config.gdn
        out |= {"linear_num_key_heads": gdn.n_heads, "linear_num_value_heads": gdn.n_v_heads,
                "linear_key_head_dim": gdn.head_dim, "linear_value_head_dim": gdn.v_head_dim,
                "linear_conv_kernel_dim": gdn.conv_kernel}
    return out


def weights_to_hf(config: ModelConfig, state) -> dict:
    out = inverted(state, _model_pairs(config))
    out["model.norm.weight"] = _uncentred(state["norm.weight"])
    for index, symbol in enumerate(config.layout):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        out |= {hf_name: _uncentred(state[strata_name]) for strata_name, hf_name in _norm_pairs(index, symbol).items()}
        out |= inverted(state, _plain_pairs(config, index, symbol))
        if symbol == "A":
            for kind in ("weight", "bias") if config.attention.bias else ("weight",):
                out |= _qkv_to_hf(config, state, ours + "mixer.", theirs + "self_attn.", kind)
        else:
            qkvz, ba = _in_proj_to_hf(config, state[ours + "mixer.in_proj.weight"])
            out[theirs + "linear_attn.in_proj_qkvz.weight"] = qkvz
            out[theirs + "linear_attn.in_proj_ba.weight"] = ba
        if config.ffn.kind == "moe":
            for expert in range(config.ffn.moe.n_experts):
                for part, name in zip(("gate", "up", "down"), EXPERT_NAMES):
                    out[f"{theirs}mlp.experts.{expert}.{name}.weight"] = state[f"{ours}ffn.experts.{expert}.{part}.weight"]
    return out


FAMILY = Family("Qwen3NextForCausalLM", "qwen3_next", config_to_strata, weights_to_strata, config_to_hf, weights_to_hf,
                exportable)


class _Renamed:
    """``tensors`` read with ``prefix`` in names standing for ``stored``."""

    def __init__(self, tensors, prefix: str, stored: str):
        self.tensors, self.prefix, self.stored = tensors, prefix, stored

    def _name(self, name: str) -> str:
        return self.stored + name.removeprefix(self.prefix) if name.startswith(self.prefix) else name

    def __getitem__(self, name: str):
        return self.tensors[self._name(name)]

    def __contains__(self, name: str) -> bool:
        return self._name(name) in self.tensors


def _qwen3_5(architecture: str, model_type: str, ffn_section) -> Family:
    return Family(architecture, model_type, functools.partial(config_to_strata, ffn_section=ffn_section),
                  functools.partial(weights_to_strata, split_projections=True))


def _qwen3_5_multimodal(architecture: str, model_type: str, ffn_section) -> Family:
    """A published Qwen3.5 checkpoint: the language model under model.language_model., a vision
    tower beside it."""
    return Family(
        architecture, model_type,
        lambda hf: config_to_strata(hf.text_config, ffn_section, tie=bool(hf.tie_word_embeddings)),
        lambda config, tensors: weights_to_strata(config, _Renamed(tensors, "model.", "model.language_model."),
                                                  split_projections=True),
        ignored=("model.visual.",))


QWEN3_5_FAMILIES = (
    _qwen3_5("Qwen3_5ForCausalLM", "qwen3_5_text", _dense_ffn),
    _qwen3_5("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", _moe_ffn),
    _qwen3_5_multimodal("Qwen3_5ForConditionalGeneration", "qwen3_5", _dense_ffn),
    _qwen3_5_multimodal("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", _moe_ffn),
)
