"""The sections of the blocks: attention (RoPE, sliding windows), Mamba-2, Gated DeltaNet, the
intra-layer hybrid, the FFN and its MoE."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from strata.config.base import Strict, _KeyedError


class RopeScaling(Strict):
    """Llama-3 frequency scaling: long wavelengths are slowed by ``factor``, short ones kept."""

    factor: float = Field(32.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_context: int = Field(8192, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must exceed low_freq_factor")
        return self


class RopeConfig(Strict):
    """Rotary embeddings on the first ``fraction`` of each head's channels (the rest pass
    unrotated: Bamba rotates half)."""

    theta: float = Field(500_000.0, gt=0)
    scaling: RopeScaling | None = None
    fraction: float = Field(1.0, gt=0, le=1)


class AttentionConfig(Strict):
    """GQA causal self-attention. ``head_dim`` defaults to ``d_model / n_heads``, ``v_head_dim`` to ``head_dim``.

    ``rope: null`` (or ``none``) gives no positional encoding at all (NoPE, as Nemotron-H's
    attention); ``softmax_scale`` replaces 1/sqrt(head_dim) (Granite's ``attention_multiplier``;
    Falcon-H1's ``key_multiplier`` times 1/sqrt(head_dim)); ``bias`` gives Q, K, V and the output
    projection biases; ``output_gate`` multiplies every head's output, channel by channel, by a
    sigmoid gate projected from the block's input (Qwen3-Next's gated attention).

    ``qk_norm`` RMSNorms the projected queries and keys before RoPE, with the stack's ``norm_eps``:
    ``head`` over each head's ``head_dim`` channels, one weight of that width shared by all Q heads
    and one by all K heads (Qwen3's and Qwen3-Next's ``q_norm``/``k_norm``); ``full`` over the whole
    projected width, weights of n_heads·head_dim and n_kv_heads·head_dim (OLMo 2/3's and OLMo
    Hybrid's). It bounds the logits q·k, which otherwise grow with the weights.
    """

    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0)
    v_head_dim: int | None = Field(None, gt=0)
    rope: RopeConfig | None = RopeConfig()
    softmax_scale: float | None = Field(None, gt=0)
    bias: bool = False
    output_gate: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"

    @field_validator("rope", mode="before")
    @classmethod
    def _none(cls, value):
        return None if value == "none" else value

    @model_validator(mode="after")
    def _gqa(self):
        if self.n_heads % self.n_kv_heads:
            raise _KeyedError("n_heads", f"{self.n_heads} is not a multiple of n_kv_heads ({self.n_kv_heads})")
        return self

    def rotary_dim(self, head_dim: int) -> int:
        """Channels of each Q/K head that RoPE rotates (0 without RoPE)."""
        return 0 if self.rope is None else int(head_dim * self.rope.fraction)

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim


class SlidingWindowConfig(Strict):
    """Settings of ``W`` blocks: attention to the last ``window`` tokens plus the first ``sinks``."""

    window: int = Field(512, gt=0)
    sinks: int = Field(64, ge=0)
    rope_theta: float = Field(10_000.0, gt=0)


class Mamba2Config(Strict):
    """The Mamba-2 (SSD) mixer. ``d_ssm`` defaults to ``expand * d_model``.

    ``norm``: how the output gate z meets the grouped RMSNorm: ``gate_then_norm`` RMSNorm(y·silu(z))
    (Mamba-2's own), ``norm_then_gate`` RMSNorm(y)·silu(z), ``gate_only`` y·silu(z) with no norm
    (Falcon-H1's options). ``bias``: in- and out-projection biases; ``conv_bias`` the conv's.
    ``projection_multipliers``: constants multiplying the in-projection's z, x, B, C and dt
    outputs (Falcon-H1's μP ``ssm_multipliers``).
    """

    d_ssm: int | None = Field(None, gt=0)
    expand: int = Field(2, gt=0)
    d_state: int = Field(128, gt=0)
    head_dim: int = Field(64, gt=0)
    n_groups: int = Field(1, gt=0)
    conv_kernel: int = Field(4, gt=0)
    chunk_size: int = Field(64, gt=0)
    a_init_range: tuple[float, float] = (0.01, 2.0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(1e-1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    bias: bool = False
    conv_bias: bool = True
    norm: Literal["gate_then_norm", "norm_then_gate", "gate_only"] = "gate_then_norm"
    projection_multipliers: tuple[float, float, float, float, float] | None = None

    @model_validator(mode="after")
    def _ranges(self):
        low, high = self.a_init_range
        if not 0 < low <= high:
            raise ValueError(f"a_init_range must satisfy 0 < low <= high, got {self.a_init_range}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        return self

    def width(self, d_model: int) -> int:
        return self.d_ssm if self.d_ssm is not None else self.expand * d_model

    def n_heads(self, d_model: int) -> int:
        return self.width(d_model) // self.head_dim


def _check_decay_init(config: GatedDeltaNetConfig | KimiDeltaConfig) -> None:
    """The delta-rule mixers' decay initialisation: A from 0 < low <= high, dt_min <= dt_max."""
    low, high = config.a_init_range
    if not 0 < low <= high:
        raise _KeyedError("a_init_range", f"must satisfy 0 < low <= high, got {config.a_init_range}")
    if config.dt_min > config.dt_max:
        raise _KeyedError("dt_min", f"({config.dt_min}) must not exceed dt_max ({config.dt_max})")


class GatedDeltaNetConfig(Strict):
    """The Gated DeltaNet mixer (``G`` blocks), as Qwen3-Next defines it: short causal convs on q,
    k and v, L2-normalised q and k, the gated delta rule with per-head decay α and step size β,
    an output gate through a per-head RMSNorm, and an out-projection.

    ``n_heads`` q/k heads of ``head_dim`` channels; ``n_v_heads`` value heads of ``v_head_dim``
    (defaults: as many and as wide); a q/k head serves n_v_heads / n_heads consecutive value heads.
    The state is n_v_heads × head_dim × v_head_dim, whatever the context.
    α_t = exp(−exp(A_log)·softplus(a_t + dt_bias)), A drawn from ``a_init_range`` and the step
    softplus(dt_bias) log-uniform in [dt_min, dt_max]; β_t = sigmoid(b_t), times 2 with
    ``allow_neg_eigval`` (OLMo Hybrid's: β in (0, 2), so I − β k kᵀ may have a negative eigenvalue).
    ``norm_eps``: the output norm's epsilon (the stack's ``norm_eps`` by default).
    """

    n_heads: int = Field(gt=0)
    n_v_heads: int | None = Field(None, gt=0)
    head_dim: int = Field(64, gt=0)
    v_head_dim: int | None = Field(None, gt=0)
    conv_kernel: int = Field(4, gt=0)
    conv_bias: bool = False
    chunk_size: int = Field(64, gt=0)
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(1e-1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    allow_neg_eigval: bool = False
    norm_eps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _shape(self):
        _check_decay_init(self)
        if self.n_v_heads is None:
            self.n_v_heads = self.n_heads
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.n_v_heads % self.n_heads:
            raise _KeyedError("n_v_heads", f"{self.n_v_heads} is not a multiple of n_heads ({self.n_heads})")
        return self

    @property
    def key_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def value_width(self) -> int:
        return self.n_v_heads * self.v_head_dim


class KimiDeltaConfig(Strict):
    """The Kimi Delta Attention mixer (``K`` blocks; Kimi Linear, Kimi Team 2025): Gated DeltaNet
    whose decay is a vector, one α per key channel, so each row of the state forgets at its own
    rate. ``n_heads`` heads of ``head_dim`` channels for q, k and v alike; short causal convs on
    q, k and v, L2-normalised q and k, β_t = sigmoid(b_t), and
    α_t = exp(−exp(A_log)·softplus(f_t + dt_bias)) with f_t from a low-rank projection
    (d_model → head_dim → n_heads·head_dim) and A one per head, dt_bias one per channel; the output
    goes through a per-head RMSNorm gated by sigmoid of a second low-rank projection, then out.
    The state is n_heads × head_dim × head_dim, whatever the context. Initialisation as Gated
    DeltaNet's (``a_init_range``, ``dt_min``, ``dt_max``, ``dt_init_floor``); ``norm_eps``: the
    output norm's epsilon (the stack's ``norm_eps`` by default).
    """

    n_heads: int = Field(gt=0)
    head_dim: int = Field(128, gt=0)
    conv_kernel: int = Field(4, gt=0)
    conv_bias: bool = False
    chunk_size: int = Field(64, gt=0)
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(1e-1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    norm_eps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _shape(self):
        _check_decay_init(self)
        return self

    @property
    def width(self) -> int:
        """Channels of q, k and v each (n_heads · head_dim)."""
        return self.n_heads * self.head_dim


class HybridConfig(Strict):
    """The intra-layer hybrid mixer of "Hybrid Architectures for Language Models" (Bae et al., 2025):
    an attention branch and a Mamba-2 branch side by side.

    The attention branch has reduced Q/K (``attention.n_heads * attention.head_dim``) and, by
    default, full-width values (``v_head_dim = mamba.d_ssm / attention.n_heads``) so both branches
    produce ``d_ssm`` channels. The defaults are the paper's final recipe.

    ``branches`` swaps the mixers: ``attn_gdn`` puts Gated DeltaNet heads (``gdn``) beside the
    attention in place of Mamba-2's (the values then default to ``gdn.value_width``); the paper's
    Table 6 baselines are ``attn_attn`` (two attention branches, the Differential Transformer) and
    ``ssm_ssm`` (two Mamba-2 branches, Differential Mamba). A branch takes the shape of its kind's
    section, and the sections its branches use are required; the others may be present and build
    nothing, so that with all of them in a file one override turns a design into another
    (``attn_attn`` sizes its values by ``mamba.d_ssm`` when that section is present, as it always
    did, else by ``attention.v_head_dim``). ``scale: lambda`` is Diff-T's re-parameterised λ on the
    subtracted branch, ``scale: alpha`` the learned mix α·b + (1 − α)·attention of the paper's
    Appendix Q (``strata.nn.hybrid``).
    """

    attention: AttentionConfig | None = None
    mamba: Mamba2Config | None = None
    gdn: GatedDeltaNetConfig | None = None
    branches: Literal["attn_ssm", "attn_attn", "ssm_ssm", "attn_gdn"] = "attn_ssm"
    norm: Literal["none", "group"] = "group"
    scale: Literal["none", "vector", "scalar", "gate", "lambda", "alpha"] = "none"
    fusion: Literal["add", "diff", "concat"] = "diff"
    share_value: bool = False
    out_proj: Literal["joint", "separate"] = "separate"
    in_multipliers: tuple[float, float] = (1.0, 1.0)
    out_multipliers: tuple[float, float] = (1.0, 1.0)

    @model_validator(mode="after")
    def _combination(self):
        if self.fusion == "concat" and self.out_proj == "separate":
            raise ValueError(
                "fusion=concat with out_proj=separate is the same function as fusion=add with "
                "out_proj=separate; choose one of those"
            )
        for kind in sorted(set(self.branch_kinds)):
            if getattr(self, kind) is None:
                raise _KeyedError(kind, f"required: branches={self.branches} builds a branch from this section")
        if self.mamba is not None and self.mamba.d_ssm is None:
            raise _KeyedError("mamba.d_ssm", "must be given for the hybrid's Mamba branch")
        if self.share_value and self.branches != "attn_ssm":
            raise _KeyedError("share_value", f"feeds the attention's values to the Mamba branch; it needs branches=attn_ssm, not {self.branches}")
        if self.scale == "lambda" and self.fusion != "diff":
            raise _KeyedError("scale", f"lambda weighs the subtracted branch; it needs fusion=diff, not {self.fusion}")
        if self.scale == "alpha" and self.fusion != "add":
            raise _KeyedError("scale", f"alpha mixes the branches as alpha*b + (1-alpha)*a; it needs fusion=add, not {self.fusion}")
        return self

    @property
    def branch_kinds(self) -> tuple[str, str]:
        """The section ("attention", "mamba" or "gdn") each branch is built from, a then b."""
        return tuple(BRANCH_SECTIONS[part] for part in self.branches.split("_"))

    def branch_width(self, kind: str) -> int:
        """The channels a branch of ``kind`` outputs (its values, once the stack resolved them)."""
        if kind == "attention":
            return self.attention.n_heads * self.attention.value_head_dim
        return self.mamba.d_ssm if kind == "mamba" else self.gdn.value_width

    @property
    def default_value_width(self) -> int | None:
        """The attention branch's value width unless ``attention.v_head_dim`` is given: the linear
        branch's, so that both produce as many channels (``mamba.d_ssm``, or ``gdn.value_width``
        beside Gated DeltaNet); None when that section is missing (``attn_attn`` without ``mamba``)."""
        if self.branches == "attn_gdn":
            return self.gdn.value_width
        return self.mamba.d_ssm if self.mamba is not None else None


# The section each part of ``HybridConfig.branches`` ("attn_ssm": attn, then ssm) is built from.
BRANCH_SECTIONS = {"attn": "attention", "ssm": "mamba", "gdn": "gdn"}
# How errors name a branch's output width, by its section.
BRANCH_WIDTHS = {"attention": "attention values", "mamba": "mamba d_ssm", "gdn": "gdn value width"}


class MoEConfig(Strict):
    """Shared + top-k routed experts, sigmoid router, bias-based (aux-loss-free) balancing.

    ``router: softmax`` is Granite's (and Mixtral's) instead: the weights are the softmax of the
    chosen experts' router logits, with no balancing bias. ``softmax_over: all`` weights the chosen
    experts by their probabilities under the softmax over all experts, which then sum to less than
    one (Qwen3-Next's and Qwen2-MoE's ``norm_topk_prob: false``; the default ``chosen`` equals
    their ``norm_topk_prob: true``, those probabilities renormalised over the chosen). ``d_shared``:
    the shared experts' width (the routed experts' by default). ``shared_gate``: the shared
    experts' summed output is multiplied, token by token, by sigmoid(w·x) of a learned vector w
    (Qwen3-Next's ``shared_expert_gate``).

    A sigmoid-routed expert's output is weighted by its sigmoid score. ``normalize_weights`` divides the
    chosen scores by their sum; it applies only for ``top_k > 1`` (the default there): at top-1 the
    normalised weight is identically 1, so the router would get no gradient and weight decay would
    shrink it to zero.
    """

    n_experts: int = Field(8, gt=0)
    top_k: int = Field(1, gt=0)
    n_shared: int = Field(1, ge=0)
    d_expert: int | None = Field(None, gt=0)
    d_shared: int | None = Field(None, gt=0)
    bias_update_rate: float = Field(1e-3, ge=0)
    normalize_weights: bool | None = None
    router: Literal["sigmoid", "softmax"] = "sigmoid"
    softmax_over: Literal["chosen", "all"] = "chosen"
    shared_gate: bool = False

    @model_validator(mode="after")
    def _top_k(self):
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        if self.softmax_over == "all" and self.router != "softmax":
            raise _KeyedError("softmax_over", f"all weighs experts by a softmax; it needs router softmax, not {self.router}")
        if self.shared_gate and self.n_shared == 0:
            raise _KeyedError("shared_gate", "gates the shared experts' output; it needs n_shared > 0")
        if self.normalize_weights and self.top_k == 1:
            raise _KeyedError(
                "normalize_weights",
                "true at top_k 1 makes every routed weight 1 and leaves the router without gradient; "
                "normalise only with top_k > 1",
            )
        if self.router == "softmax":
            if self.normalize_weights:
                raise _KeyedError("normalize_weights", "applies to the sigmoid router; the softmax router's weights "
                                                       "sum to one with softmax_over: chosen (its default)")
            self.normalize_weights = False
        if self.normalize_weights is None:
            self.normalize_weights = self.top_k > 1
        return self


class FFNConfig(Strict):
    """The feed-forward half of every block: SwiGLU, squared-ReLU MLP (``relu2``, Nemotron-H's
    ``up`` then ``down``), MoE of SwiGLU experts, or none.

    ``bias``: biases on the SwiGLU or relu2 projections. ``multipliers``: constants on the SwiGLU
    gate's pre-activation and on its output (Falcon-H1's μP ``mlp_multipliers``).
    """

    kind: Literal["swiglu", "relu2", "moe", "none"] = "swiglu"
    d_ffn: int = Field(0, ge=0)
    moe: MoEConfig | None = None
    bias: bool = False
    multipliers: tuple[float, float] = (1.0, 1.0)

    @model_validator(mode="after")
    def _sizes(self):
        if self.kind != "none" and self.d_ffn == 0:
            raise ValueError(f"d_ffn must be positive for kind={self.kind}")
        if self.kind == "moe" and self.moe is None:
            self.moe = MoEConfig()
        if self.kind != "swiglu" and self.multipliers != (1.0, 1.0):
            raise _KeyedError("multipliers", f"scale the SwiGLU's gate and output; kind is {self.kind}")
        if self.kind not in ("swiglu", "relu2") and self.bias:
            raise _KeyedError("bias", f"applies to swiglu and relu2 projections; kind is {self.kind}")
        return self

    @property
    def shared_width(self) -> int:
        assert self.moe is not None
        return self.moe.d_shared or self.expert_width

    @property
    def expert_width(self) -> int:
        """Routed experts are half the dense width unless set (the hybrid paper's MoE)."""
        assert self.moe is not None
        return self.moe.d_expert or self.d_ffn // 2
