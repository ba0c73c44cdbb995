"""Cost model: parameters, training FLOPs per token and inference cache bytes, from a config alone.

Formulas follow the cost formulas of "Hybrid Architectures for Language Models" (Bae et al.,
2025), per block, one sequence of length L:
    attention   6·(H·d_qk + H·d_v)·pairs, pairs = L(L+1)/2      (= 12·d_model·L(L+1)/2 when H·d = d_model)
    sliding     the same over pairs = L_w(L_w+1)/2 + L_w(L − L_w), L_w = window + sinks
    Mamba-2     3·L·(9·d_ssm·d_state + 2·d_ssm)
    Gated DeltaNet  3·L·(9·H·d_k·d_v + 2·H·d_v): Mamba-2's formula with its state (H value heads of
                d_k × d_v) for Mamba-2's (d_ssm × d_state), so that FLOPs-matched comparisons charge the two
                linear mixers alike (the paper's Mamba-2 term leaves out its chunked scan's within-chunk
                products, so a count of the chunked delta rule's would charge Gated DeltaNet alone for them)
    cache       attention 2·N_kv·(d_qk + d_v)·L elements; Mamba-2 d_ssm·d_state + conv·(2·g·d_state + d_ssm);
                Gated DeltaNet H·d_k·d_v + conv·(2·H_qk·d_k + H·d_v)
    hybrid      the sum over its two branches (attention and Mamba-2 or Gated DeltaNet, or two of one kind:
                Table 6's T/T, M/M)
Training FLOPs per token = 6·(non-embedding params a token uses: for MoE the router, shared and
top-k experts) + the mixers' sequence terms / L, the paper's
convention (it matches the paper's budgets, e.g. Llama-1B × 60B tokens = 4.5e20);
``flops_per_token_with_head`` adds the output head's 6·d_model·vocab, the compute actually spent.
Parameter counts are exact; a test holds them equal to the built modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from strata.config import (
    AttentionConfig,
    FFNConfig,
    GatedDeltaNetConfig,
    HybridConfig,
    KimiDeltaConfig,
    Mamba2Config,
    ModelConfig,
    StackConfig,
)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class BlockCost:
    index: int
    symbol: str
    params: int
    flops_per_token: float
    cache_bytes: int


@dataclass
class ModelCost:
    layout: str
    context: int
    dtype: str
    params: int
    non_embedding_params: int
    flops_per_token: float
    flops_per_token_with_head: float
    cache_bytes: int
    blocks: list[BlockCost] = field(default_factory=list)

    @property
    def cache_mib(self) -> float:
        return self.cache_bytes / 2**20

    def to_dict(self) -> dict:
        data = asdict(self)
        data["cache_mib"] = self.cache_mib
        return data


# --- parameters ------------------------------------------------------------------------------


def attention_params(d_model: int, attention: AttentionConfig, output_projection: bool = True) -> int:
    qkv_width = (attention.n_heads + attention.n_kv_heads) * attention.head_dim + attention.n_kv_heads * attention.value_head_dim
    qkv_width += attention.n_heads * attention.value_head_dim if attention.output_gate else 0
    o = (attention.n_heads * attention.value_head_dim + attention.bias) * d_model if output_projection else 0
    return (d_model + attention.bias) * qkv_width + o + qk_norm_params(attention)


def qk_norm_params(attention: AttentionConfig) -> int:
    """The Q and K norms' weights: a head's width each (``head``), or the projections' (``full``)."""
    if attention.qk_norm == "head":
        return 2 * attention.head_dim
    if attention.qk_norm == "full":
        return (attention.n_heads + attention.n_kv_heads) * attention.head_dim
    return 0


def mamba_params(d_model: int, mamba: Mamba2Config, external_x: bool = False, output_projection: bool = True) -> int:
    d_ssm = mamba.width(d_model)
    heads = d_ssm // mamba.head_dim
    bc = 2 * mamba.n_groups * mamba.d_state
    in_proj = (d_model + mamba.bias) * (d_ssm + (0 if external_x else d_ssm) + bc + heads)
    conv = (d_ssm + bc) * (mamba.conv_kernel + mamba.conv_bias)
    per_head = 3 * heads  # dt_bias, A_log, D
    norm = 0 if mamba.norm == "gate_only" else d_ssm
    out_proj = (d_ssm + mamba.bias) * d_model if output_projection else 0
    return in_proj + conv + per_head + norm + out_proj


def gdn_params(d_model: int, gdn: GatedDeltaNetConfig, output_projection: bool = True) -> int:
    conv_dim = 2 * gdn.key_width + gdn.value_width
    in_proj = d_model * (conv_dim + gdn.value_width + 2 * gdn.n_v_heads)
    conv = conv_dim * (gdn.conv_kernel + gdn.conv_bias)
    out_proj = gdn.value_width * d_model if output_projection else 0
    return in_proj + conv + 2 * gdn.n_v_heads + gdn.v_head_dim + out_proj  # + A_log, dt_bias, norm


def kda_params(d_model: int, kda: KimiDeltaConfig) -> int:
    width, head_dim = kda.width, kda.head_dim
    in_proj = d_model * (3 * width + 2 * head_dim + kda.n_heads)  # q, k, v, the two low-rank inputs, b
    low_rank = 2 * head_dim * width  # f_b_proj, g_b_proj
    conv = 3 * width * (kda.conv_kernel + kda.conv_bias)
    return in_proj + low_rank + conv + kda.n_heads + width + head_dim + width * d_model  # + A_log, dt_bias, norm, out


def hybrid_params(d_model: int, hybrid: HybridConfig) -> int:
    """The two branches (a, b) of ``hybrid.branches``, each shaped by its kind's section."""
    attention, mamba, gdn = hybrid.attention, hybrid.mamba, hybrid.gdn
    kinds = hybrid.branch_kinds
    widths = [hybrid.branch_width(kind) for kind in kinds]
    heads = [attention.n_heads if kind == "attention" else gdn.n_v_heads if kind == "gdn" else mamba.n_heads(d_model)
             for kind in kinds]
    total = sum(
        attention_params(d_model, attention, output_projection=False) if kind == "attention"
        else gdn_params(d_model, gdn, output_projection=False) if kind == "gdn"
        else mamba_params(d_model, mamba, external_x=hybrid.share_value, output_projection=False)
        for kind in kinds
    )
    if hybrid.norm == "group":
        total += 2 * sum(widths)
    if hybrid.scale == "vector":
        total += sum(widths)
    elif hybrid.scale in ("scalar", "alpha"):
        total += 1
    elif hybrid.scale == "gate":
        total += (d_model + 1) * sum(heads)
    elif hybrid.scale == "lambda":  # four vectors as wide as a head of branch a
        total += 4 * (attention.head_dim if kinds[0] == "attention" else mamba.head_dim)
    if hybrid.out_proj == "separate" or hybrid.fusion == "concat":
        total += sum(widths) * d_model
    else:
        total += widths[1] * d_model
    return total


def ffn_params(d_model: int, ffn: FFNConfig, active: bool = False) -> int:
    """FFN parameters; with ``active``, only those a token uses (router, shared and top-k experts)."""
    if ffn.kind == "none":
        return 0
    if ffn.kind in ("swiglu", "relu2"):
        matrices = 3 if ffn.kind == "swiglu" else 2
        return matrices * d_model * ffn.d_ffn + ffn.bias * ((matrices - 1) * ffn.d_ffn + d_model)
    moe = ffn.moe
    experts = moe.top_k if active else moe.n_experts
    router = d_model * (moe.n_experts + moe.shared_gate)
    return router + 3 * d_model * (experts * ffn.expert_width + moe.n_shared * ffn.shared_width)


def mixer_params(symbol: str, config: StackConfig) -> int:
    if symbol in "AW":
        return attention_params(config.d_model, config.attention)
    if symbol == "M":
        return mamba_params(config.d_model, config.mamba)
    if symbol == "G":
        return gdn_params(config.d_model, config.gdn)
    if symbol == "K":
        return kda_params(config.d_model, config.kda)
    return hybrid_params(config.d_model, config.hybrid)


def block_params(symbol: str, config: StackConfig, active: bool = False) -> int:
    """A block's norms, mixer and FFN: an ``F`` block is its FFN alone, and a layout with ``F``
    blocks gives the other blocks no FFN."""
    has_ffn = config.ffn.kind != "none" and (symbol == "F" or "F" not in config.layout)
    mixer = 0 if symbol == "F" else config.d_model + mixer_params(symbol, config)
    ffn = config.d_model + ffn_params(config.d_model, config.ffn, active) if has_ffn else 0
    return mixer + ffn


# --- FLOPs -----------------------------------------------------------------------------------


def causal_pairs(length: int, window: int | None = None) -> float:
    """(query, key) pairs a causal (optionally windowed) attention computes over a sequence."""
    if window is None or window >= length:
        return length * (length + 1) / 2
    return window * (window + 1) / 2 + window * (length - window)


def attention_sequence_flops(attention: AttentionConfig, length: int, window: int | None = None) -> float:
    width = attention.n_heads * (attention.head_dim + attention.value_head_dim)
    return 6 * width * causal_pairs(length, window)


def mamba_sequence_flops(d_ssm: int, d_state: int, length: int) -> float:
    return 3 * length * (9 * d_ssm * d_state + 2 * d_ssm)


def delta_rule_sequence_flops(heads: int, d_k: int, d_v: int, length: int) -> float:
    """The gated delta rule's state work over a sequence, counted as Mamba-2's scan is: a state of
    heads × d_k × d_v read and written per step (a per-channel decay costs as much as a scalar)."""
    return 3 * length * (9 * heads * d_k * d_v + 2 * heads * d_v)


def gdn_sequence_flops(gdn: GatedDeltaNetConfig, length: int) -> float:
    return delta_rule_sequence_flops(gdn.n_v_heads, gdn.head_dim, gdn.v_head_dim, length)


def mixer_sequence_flops(symbol: str, config: StackConfig, length: int) -> float:
    """The training FLOPs of one sequence beyond 6·params·L (the hybrid paper's cost formulas)."""
    if symbol == "F":
        return 0
    if symbol == "A":
        return attention_sequence_flops(config.attention, length)
    if symbol == "W":
        window = config.sliding_window
        return attention_sequence_flops(config.attention, length, window.window + window.sinks)
    if symbol == "M":
        return mamba_sequence_flops(config.mamba.width(config.d_model), config.mamba.d_state, length)
    if symbol == "G":
        return gdn_sequence_flops(config.gdn, length)
    if symbol == "K":
        return delta_rule_sequence_flops(config.kda.n_heads, config.kda.head_dim, config.kda.head_dim, length)
    hybrid = config.hybrid
    return sum(
        attention_sequence_flops(hybrid.attention, length) if kind == "attention"
        else gdn_sequence_flops(hybrid.gdn, length) if kind == "gdn"
        else mamba_sequence_flops(hybrid.mamba.width(config.d_model), hybrid.mamba.d_state, length)
        for kind in hybrid.branch_kinds
    )


# --- cache -----------------------------------------------------------------------------------


def attention_cache_elements(attention: AttentionConfig, tokens: int) -> int:
    return attention.n_kv_heads * (attention.head_dim + attention.value_head_dim) * tokens


def mamba_cache_elements(d_model: int, mamba: Mamba2Config) -> int:
    d_ssm = mamba.width(d_model)
    return d_ssm * mamba.d_state + mamba.conv_kernel * (2 * mamba.n_groups * mamba.d_state + d_ssm)


def gdn_cache_elements(gdn: GatedDeltaNetConfig) -> int:
    return gdn.n_v_heads * gdn.head_dim * gdn.v_head_dim + gdn.conv_kernel * (2 * gdn.key_width + gdn.value_width)


def mixer_cache_elements(symbol: str, config: StackConfig, length: int) -> int:
    if symbol == "F":
        return 0
    if symbol == "A":
        return attention_cache_elements(config.attention, length)
    if symbol == "W":
        window = config.sliding_window
        return attention_cache_elements(config.attention, min(length, window.window + window.sinks))
    if symbol == "M":
        return mamba_cache_elements(config.d_model, config.mamba)
    if symbol == "G":
        return gdn_cache_elements(config.gdn)
    if symbol == "K":
        return config.kda.n_heads * config.kda.head_dim**2 + config.kda.conv_kernel * 3 * config.kda.width
    hybrid = config.hybrid
    return sum(
        attention_cache_elements(hybrid.attention, length) if kind == "attention"
        else gdn_cache_elements(hybrid.gdn) if kind == "gdn"
        else mamba_cache_elements(config.d_model, hybrid.mamba)
        for kind in hybrid.branch_kinds
    )


# --- whole model -----------------------------------------------------------------------------


def model_cost(config: ModelConfig, context: int | None = None, dtype: str = "bf16") -> ModelCost:
    """Every figure ``strata info`` prints, per block and in total, without allocating weights."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    length = config.context_length if context is None else context
    if length < 1:
        raise ValueError(f"context must be a positive number of tokens, got {length}")
    element_bytes = DTYPE_BYTES[dtype]
    blocks = []
    for index, symbol in enumerate(config.layout, start=1):
        params = block_params(symbol, config)
        # FLOPs follow the parameters a token actually uses (a MoE token visits top-k experts).
        flops = 6 * block_params(symbol, config, active=True) + mixer_sequence_flops(symbol, config, length) / length
        cache = element_bytes * mixer_cache_elements(symbol, config, length)
        blocks.append(BlockCost(index, symbol, params, flops, cache))
    embedding = config.vocab_size * config.d_model
    head = 0 if config.tie_embeddings else embedding
    non_embedding = sum(b.params for b in blocks) + config.d_model  # final norm
    flops = sum(b.flops_per_token for b in blocks) + 6 * config.d_model
    return ModelCost(
        layout=config.layout,
        context=length,
        dtype=dtype,
        params=non_embedding + embedding + head,
        non_embedding_params=non_embedding,
        flops_per_token=flops,
        flops_per_token_with_head=flops + 6 * config.d_model * config.vocab_size,
        cache_bytes=sum(b.cache_bytes for b in blocks),
        blocks=blocks,
    )
