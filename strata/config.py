"""Typed, validated configuration: YAML files plus ``key.sub=value`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo stops the run with the key's
dotted path. Sizes that must agree (heads dividing widths, a section per layout symbol) are checked
here, once, instead of failing deep inside a module.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from strata.layout import BLOCK_SYMBOLS, PLACEMENTS, check_layout, make_layout


class ConfigError(ValueError):
    """A bad configuration; ``str()`` is one line that names the file and the key."""


class _KeyedError(ValueError):
    """A cross-field error that names the key to blame, relative to the section that raised it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False)


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
        low, high = self.a_init_range
        if not 0 < low <= high:
            raise _KeyedError("a_init_range", f"must satisfy 0 < low <= high, got {self.a_init_range}")
        if self.dt_min > self.dt_max:
            raise _KeyedError("dt_min", f"({self.dt_min}) must not exceed dt_max ({self.dt_max})")
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


class LayoutSpec(Strict):
    """A layout given by ratio and placement instead of spelled out; resolved to a string."""

    layers: int = Field(gt=0)
    ratio: str = "1:5"
    placement: str | list[int] = "middle"
    special: str = "A"
    base: str = "M"

    @field_validator("ratio", mode="before")
    @classmethod
    def _quoted(cls, value):
        if isinstance(value, int):  # YAML 1.1 reads an unquoted 1:5 as the base-60 number 65
            raise ValueError('quote the ratio ("1:5"): YAML reads an unquoted 1:5 as a base-60 number')
        return value

    @field_validator("placement")
    @classmethod
    def _known(cls, value):
        if isinstance(value, str) and value not in PLACEMENTS:
            raise ValueError(f"unknown placement {value!r}; known: {', '.join(PLACEMENTS)}")
        return value


class StackConfig(Strict):
    """A stack of residual blocks of one width: its layout and the sections its symbols need.

    ``residual_multiplier`` scales what each sublayer adds to the residual stream (Granite's).

    ``post_norm``: the layout symbols whose blocks normalise each sublayer's output instead of its
    input, x + norm(f(x)) for x + f(norm(x)) (OLMo 2's and OLMo Hybrid's attention blocks; the
    residual stream itself is never normalised). The norms keep their names and sizes.

    A plain language model is one stack; each stage of an AU-Net is one (``StageConfig``).
    """

    d_model: int = Field(gt=0)
    layout: str
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    attention: AttentionConfig | None = None
    sliding_window: SlidingWindowConfig | None = None
    mamba: Mamba2Config | None = None
    gdn: GatedDeltaNetConfig | None = None
    hybrid: HybridConfig | None = None
    ffn: FFNConfig = FFNConfig(kind="none")
    residual_multiplier: float = Field(1.0, gt=0)
    post_norm: str = ""

    @field_validator("post_norm")
    @classmethod
    def _post_norm_symbols(cls, value: str) -> str:
        unknown = sorted(set(value) - set(BLOCK_SYMBOLS))
        if unknown:
            raise ValueError(f"{''.join(unknown)!r} is not a block symbol; known: {''.join(BLOCK_SYMBOLS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"{value!r} names a symbol twice")
        return value

    @field_validator("layout", mode="before")
    @classmethod
    def _resolve_layout(cls, value: Any) -> str:
        if isinstance(value, dict):
            spec = LayoutSpec.model_validate(value)
            return make_layout(spec.layers, spec.ratio, spec.placement, spec.special, spec.base)
        if isinstance(value, str):
            return check_layout(value.strip())
        raise ValueError("layout must be a string of block symbols or a mapping {layers, ratio, placement}")

    @property
    def n_layers(self) -> int:
        return len(self.layout)

    @model_validator(mode="after")
    def _consistent(self):
        symbols = set(self.layout)
        needs = {"A": "attention", "W": "attention", "M": "mamba", "G": "gdn", "H": "hybrid"}
        for symbol, section in needs.items():
            if symbol in symbols and getattr(self, section) is None:
                raise _KeyedError(section, f"layout uses {symbol!r} blocks but the '{section}' section is missing")
        if "W" in symbols and self.sliding_window is None:
            self.sliding_window = SlidingWindowConfig()
        if "F" in symbols and self.ffn.kind == "none":
            raise _KeyedError("ffn.kind", "layout has F (feed-forward) blocks but ffn.kind is none")
        if self.attention is not None:
            if self.attention.head_dim is None:
                if self.d_model % self.attention.n_heads:
                    raise _KeyedError(
                        "attention.n_heads",
                        f"{self.attention.n_heads} does not divide d_model ({self.d_model}); set head_dim or change n_heads",
                    )
                self.attention.head_dim = self.d_model // self.attention.n_heads
            if self.attention.v_head_dim not in (None, self.attention.head_dim):
                raise _KeyedError("attention.v_head_dim", "must equal head_dim for A/W blocks")
            _check_rotary(self.attention, "attention")
        if self.mamba is not None:
            self._check_mamba(self.mamba, "mamba")
        if self.hybrid is not None and self.hybrid.mamba is not None:
            self._check_mamba(self.hybrid.mamba, "hybrid.mamba")
        if self.hybrid is not None and self.hybrid.attention is not None:
            attention = self.hybrid.attention
            if attention.head_dim is None:
                raise _KeyedError("hybrid.attention.head_dim", "required: the Q/K head width of the attention branch")
            if attention.v_head_dim is None:
                width = self.hybrid.default_value_width
                source = "hybrid.gdn.value_width" if self.hybrid.branches == "attn_gdn" else "hybrid.mamba.d_ssm"
                if width is None:
                    raise _KeyedError("hybrid.attention.v_head_dim", "required: there is no hybrid.mamba section to size "
                                                                     "the values by")
                if width % attention.n_heads:
                    raise _KeyedError(
                        "hybrid.attention.n_heads",
                        f"{attention.n_heads} does not divide {source} ({width}), the value width",
                    )
                attention.v_head_dim = width // attention.n_heads
            _check_rotary(attention, "hybrid.attention")
            if attention.qk_norm != "none":
                raise _KeyedError("hybrid.attention.qk_norm", "applies to A and W blocks; the hybrid's attention branch "
                                                              "normalises no queries or keys")
            v_width, kinds = attention.n_heads * attention.value_head_dim, self.hybrid.branch_kinds
            width_a, width_b = (self.hybrid.branch_width(kind) for kind in kinds)
            if self.hybrid.fusion in ("add", "diff") and self.hybrid.out_proj == "joint" and width_a != width_b:
                raise _KeyedError(
                    "hybrid.attention.v_head_dim",
                    f"joint {self.hybrid.fusion} fusion needs equal branch widths: {BRANCH_WIDTHS[kinds[0]]} "
                    f"{width_a} vs {BRANCH_WIDTHS[kinds[1]]} {width_b}",
                )
            if self.hybrid.share_value and v_width != self.hybrid.mamba.d_ssm:
                raise _KeyedError("hybrid.share_value",
                                  f"needs attention value width {v_width} == d_ssm {self.hybrid.mamba.d_ssm}")
        if self.ffn.kind == "moe" and self.ffn.expert_width < 1:
            raise _KeyedError("ffn.moe.d_expert", "expert width must be positive")
        return self

    def _check_mamba(self, mamba: Mamba2Config, key: str) -> None:
        width = mamba.width(self.d_model)
        if width % mamba.head_dim:
            raise _KeyedError(f"{key}.head_dim", f"{mamba.head_dim} does not divide d_ssm ({width})")
        n_heads = width // mamba.head_dim
        if n_heads % mamba.n_groups:
            raise _KeyedError(f"{key}.n_groups", f"{mamba.n_groups} does not divide the {n_heads} SSM heads")


def _check_rotary(attention: AttentionConfig, key: str) -> None:
    if attention.rotary_dim(attention.head_dim) % 2:
        fraction = attention.rope.fraction
        blamed = f"{key}.head_dim" if fraction == 1 else f"{key}.rope.fraction"
        raise _KeyedError(blamed, f"RoPE rotates {fraction:g} of head_dim {attention.head_dim}, an odd number of "
                                  "channels; it needs an even number")


class ModelConfig(StackConfig):
    """A language model: embedding, one stack of blocks, final norm, output head.

    ``embedding_multiplier`` and ``logits_multiplier`` are constants on the embedding's output and
    on the logits (the μP multipliers of Falcon-H1 and Granite; Granite divides by ``logits_scaling``).
    """

    kind: Literal["lm"] = "lm"
    vocab_size: int = Field(gt=0)
    context_length: int = Field(2048, gt=0)
    tie_embeddings: bool = True
    embedding_multiplier: float = Field(1.0, gt=0)
    logits_multiplier: float = Field(1.0, gt=0)


class StageConfig(StackConfig):
    """One AU-Net stage. Stage 1 reads bytes; stage k > 1 reads the positions where the split rule
    puts a split of depth k-1 or more. Stages below the deepest have an encoder and a decoder of
    this layout each (separate weights); the deepest, the trunk, runs its layout once.

    ``split_every``: words (word rule), pre-tokeniser pieces (pretokenizer rule) or bytes (stride
    rule) per split of this stage, or the bytes per position the learned rule's ratio loss aims at;
    the rule's default when unset; must be unset for stage 1.
    ``max_length``: a static length for this stage's sequences (for torch.compile); splits beyond
    it are dropped and shorter sequences padded. Unset: as long as the batch needs.
    """

    split_every: int | None = Field(None, gt=0)
    max_length: int | None = Field(None, gt=0)


class SplitConfig(Strict):
    """Where AU-Net pools: a rule that gives every byte a level (``strata.data.splitter``), or
    ``learned``: H-Net's dynamic chunking, a router per stage that places the boundaries from the
    encoder's states (``strata.models.chunking``), its compression held near each stage's
    ``split_every`` bytes per position by a ratio loss of weight ``ratio_loss_weight``, or
    ``entropy``: BLT's entropy patching, splits after the bytes where a small byte-level language
    model finds the next byte hard to predict (``strata.data.splitter.EntropySplitter``,
    ``strata.models.entropy``).

    The entropy rule's keys: ``model``, the byte model (a strata run directory or checkpoint of a
    ``data.tokenizer: bytes`` language model; its trained weights are copied into a new AU-Net
    run, whose checkpoints then carry them); ``thresholds``, bits, one per level 1..S-1,
    increasing: byte i gets the deepest level whose threshold its entropy H_i exceeds, H_i being
    the entropy of the model's distribution of the token after byte i; ``margin`` (bits, BLT's
    relative rule): level 1 at least where H_i - H_(i-1) exceeds it; ``window``: the model reads
    the bytes in windows of this many from each document's start, BOS first (default 128).
    ``byte_model``: the byte model's architecture (its run's ``model`` section), read from
    ``model`` when unset; ``strata train`` writes it into the run's config, so a trained AU-Net
    opens without the byte model's run."""

    rule: Literal["word", "pretokenizer", "stride", "learned", "entropy"] = "word"
    ratio_loss_weight: float = Field(0.03, ge=0)
    model: str | None = Field(None, min_length=1)
    thresholds: list[float] | None = Field(None, min_length=1)
    margin: float | None = Field(None, ge=0)
    window: int | None = Field(None, gt=0)
    byte_model: ModelConfig | None = None

    @model_validator(mode="after")
    def _entropy_keys(self):
        keys = ("model", "thresholds", "margin", "window", "byte_model")
        if self.rule != "entropy":
            for key in keys:
                if getattr(self, key) is not None:
                    raise _KeyedError(key, f"applies to the entropy rule; rule is {self.rule}")
            return self
        if self.model is None:
            raise _KeyedError("model", "required for the entropy rule: the byte model's run directory or checkpoint")
        if self.thresholds is None:
            raise _KeyedError("thresholds", "required for the entropy rule: bits, one per level 1..S-1")
        if any(not math.isfinite(value) or value < 0 for value in self.thresholds):
            raise _KeyedError("thresholds", f"must be finite numbers of bits >= 0; got {self.thresholds}")
        if any(deep <= shallow for shallow, deep in itertools.pairwise(self.thresholds)):
            raise _KeyedError("thresholds", f"must increase from level to level, since deeper stages split "
                                            f"less often; got {self.thresholds}")
        if self.window is None:
            self.window = 128
        if self.byte_model is not None:
            _check_byte_model(self.byte_model, self.window)
        return self

    def entropy_model_config(self) -> ModelConfig:
        """The byte model's architecture: ``byte_model``, else read from the run at ``model``
        (its config.yaml, which must describe a bytes language model). ConfigError names the key."""
        if self.rule != "entropy":
            raise ValueError(f"the {self.rule} rule has no entropy model")
        if self.byte_model is not None:
            return self.byte_model
        path = Path(self.model).expanduser()
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"model.split.model: {self.model} holds no strata run (config.yaml); train the byte "
                              f"model first (strata train configs/tiny/byte-entropy.yaml --out {self.model}) or "
                              "give model.split.byte_model")
        config = load_config(run_dir / "config.yaml")
        if not isinstance(config.model, ModelConfig) or config.data.tokenizer != "bytes":
            raise ConfigError(f"model.split.model: {self.model} is not a byte-level language model (kind lm, "
                              "data.tokenizer: bytes)")
        try:
            _check_byte_model(config.model, self.window)
        except _KeyedError as error:
            raise ConfigError(f"model.split.{error.key}: {error.message} ({self.model})") from None
        return config.model


def _check_byte_model(model: ModelConfig, window: int) -> None:
    if model.vocab_size < 257:
        raise _KeyedError("byte_model.vocab_size", f"{model.vocab_size} cannot hold the bytes and BOS (id 256)")
    if window + 1 > model.context_length:
        raise _KeyedError("window", f"the byte model reads BOS and {window} bytes, beyond its context_length "
                                    f"{model.context_length}")


class AUNetConfig(Strict):
    """The autoregressive U-Net over bytes of "From Bytes to Ideas: Language Modeling with
    Autoregressive U-Nets" (Videau et al., 2025): stages from bytes to the trunk.

    ``upsample``: how a coarse vector is spread over the finer positions of its segment:
    ``multilinear`` (a shared Linear plus one Linear per offset, offsets modulo ``max_offset``),
    ``repeat`` (one Linear plus a learned bias per offset) or ``simple`` (one Linear, placed only
    at the segment's first position).
    """

    kind: Literal["aunet"]
    vocab_size: int = Field(gt=0)
    context_length: int = Field(8192, gt=0)
    init_std: float = Field(0.02, gt=0)
    split: SplitConfig = SplitConfig()
    upsample: Literal["multilinear", "repeat", "simple"] = "multilinear"
    max_offset: int = Field(16, gt=0)
    stages: list[StageConfig] = Field(min_length=2)

    @model_validator(mode="after")
    def _stages(self):
        if self.stages[0].split_every is not None:
            raise _KeyedError("stages.0.split_every", "stage 1 reads every byte; split_every applies to deeper stages")
        given = [stage.split_every for stage in self.stages[1:]]
        if self.split.rule == "learned" and given[0] is not None and given[0] < 2:
            raise _KeyedError("stages.1.split_every", "the learned rule needs a target of 2 or more bytes per position")
        if any(every is not None for every in given) and None in given:
            index = given.index(None) + 1
            raise _KeyedError(f"stages.{index}.split_every", "give split_every for every stage after the first, or for none")
        if None not in given:
            for index in range(2, len(given) + 1):
                if given[index - 1] <= given[index - 2]:
                    raise _KeyedError(
                        f"stages.{index}.split_every",
                        f"{given[index - 1]} must exceed the previous stage's {given[index - 2]}: deeper stages are coarser",
                    )
        if self.split.rule == "entropy":
            if None not in given:
                raise _KeyedError("stages.1.split_every", "does not apply to the entropy rule: its thresholds place the splits")
            if len(self.split.thresholds) != self.n_stages - 1:
                raise _KeyedError("split.thresholds", f"give one per level 1..{self.n_stages - 1} ({self.n_stages} stages); "
                                                      f"got {len(self.split.thresholds)}")
        for index, stage in enumerate(self.stages[:-1]):
            deeper = self.stages[index + 1].max_length
            if stage.max_length is not None and deeper is not None and deeper > stage.max_length:
                raise _KeyedError(f"stages.{index + 1}.max_length", "exceeds the previous stage's max_length")
        return self

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def d_model(self) -> int:
        """Width of the byte stage, where the embedding and the head are."""
        return self.stages[0].d_model

    @property
    def layout(self) -> str:
        """The stages' layouts joined by ';' (encoder layouts; decoders repeat them)."""
        return ";".join(stage.layout for stage in self.stages)

    def splitter_settings(self) -> dict:
        """Keyword arguments of ``strata.data.splitter.make_splitter`` for this model (the learned
        rule's splitter marks no byte: its model places the splits; the entropy rule's needs its
        byte model's ``score`` besides)."""
        everies = [stage.split_every for stage in self.stages[1:]]
        if self.split.rule == "learned":
            return {"rule": "none", "stages": self.n_stages}
        if self.split.rule == "entropy":  # with the entropy model's score (``strata.models.entropy``)
            split = self.split
            return {"rule": "entropy", "stages": self.n_stages, "window": split.window,
                    "thresholds": list(split.thresholds), "margin": split.margin}
        key = "strides" if self.split.rule == "stride" else "groups"
        return {"rule": self.split.rule, "stages": self.n_stages, key: None if None in everies else everies}

    def learned_compression(self) -> list[float]:
        """The learned rule's targets: bytes per position of stages 2..S (``split_every``, by
        default 4, 8, 16, ...)."""
        everies = [stage.split_every for stage in self.stages[1:]]
        return [float(every) for every in everies] if None not in everies else [4.0 * 2**k for k in range(len(everies))]


def _model_kind(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("kind", "lm")
    return getattr(value, "kind", "lm")


AnyModelConfig = Annotated[
    Annotated[ModelConfig, Tag("lm")] | Annotated[AUNetConfig, Tag("aunet")],
    Discriminator(_model_kind, custom_error_type="model_kind", custom_error_message="kind must be 'lm' (one stack of blocks) or 'aunet'"),
]


class HFTokenizerConfig(Strict):
    """A Hugging Face ``tokenizers`` file used as it is: ``path`` is a tokenizer.json or a folder
    holding one (relative paths from the working directory, as data sources). Frozen, so that it
    hashes and compares like the strings ``bytes`` and ``bpe``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["hf"] = "hf"
    path: str = Field(min_length=1)


class DataConfig(Strict):
    """What to train on. ``sources`` are .txt files, folders of them, .jsonl files (one JSON object a
    line, text under ``text_field``) or named corpora (``shakespeare``), fetched on first use.
    ``tokenizer``: ``bytes``, ``bpe`` (trained on the training split, ``bpe_vocab_size`` ids) or
    ``{kind: hf, path: FILE_OR_DIR}`` (strata/data/tokenizer.py). ``document_masking``: training
    rows pack documents (BOS before each) as the papers do, attending across the seams; true keeps
    each document to itself (segment ids from the BOS positions; strata eval scores documents one
    at a time, so it never crosses a seam either way)."""

    sources: list[str] = Field(default_factory=lambda: ["shakespeare"])
    text_field: str = "text"
    tokenizer: Literal["bytes", "bpe"] | HFTokenizerConfig = "bytes"
    bpe_vocab_size: int = Field(4096, ge=260)
    valid_fraction: float = Field(0.05, gt=0, lt=0.5)
    document_masking: bool = False

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_form(cls, value):
        # Checked here rather than by the union, whose error for a bad mapping would name the
        # union's members instead of the key.
        if isinstance(value, str):
            if value not in ("bytes", "bpe"):
                raise ValueError("expected bytes, bpe or {kind: hf, path: FILE_OR_DIR}")
            return value
        if isinstance(value, dict):
            if value.get("kind", "hf") != "hf":  # kind may be left out: data.tokenizer.path=DIR
                raise _KeyedError("kind", f"expected hf (got {value['kind']!r}); bytes and bpe are plain strings")
            unknown = sorted(set(value) - {"kind", "path"})
            if unknown:
                raise _KeyedError(str(unknown[0]), "unknown key")
            if not isinstance(value.get("path"), str) or not value["path"]:
                raise _KeyedError("path", "required: a tokenizer.json or a folder holding one")
            return HFTokenizerConfig(**value)
        if isinstance(value, HFTokenizerConfig):
            return value
        raise ValueError("expected bytes, bpe or {kind: hf, path: FILE_OR_DIR}")

    @property
    def tokenizer_kind(self) -> str:
        """``bytes``, ``bpe`` or ``hf``."""
        return self.tokenizer if isinstance(self.tokenizer, str) else self.tokenizer.kind


class TrainConfig(Strict):
    """How to train. The run stops at the first of steps, tokens, flops, or time_limit (seconds).

    Under ``torchrun`` (``strata/train/distributed.py``): ``parallel`` is ``ddp`` (replicated
    weights, averaged gradients) or ``fsdp`` (FSDP2, weights and optimiser state sharded per
    block); ``auto`` is ddp with several processes and nothing with one. ``batch_size`` stays the
    global batch, split evenly among the processes. ``activation_checkpointing`` recomputes each
    block's activations in the backward pass; ``compile`` compiles each block; both apply to the
    training forward only. ``dist_timeout``: seconds a collective waits for the other processes
    before the run fails (a dead or stuck rank). ``carry_state``: truncated backpropagation through
    time: each row reads its own stretch of the stream window after window, and the model's state
    (Mamba-2's conv and SSM state, attention's keys and values: at most ``carry_context`` tokens of
    them, by default ``seq_len``) flows from one window to the next, detached. ``init_from``: a strata run or checkpoint, or a
    Hugging Face model directory, whose weights (and tokenizer) a new run starts from (fine-tuning;
    ``strata train CONFIG --init-from DIR`` sets it with the model section to match).
    """

    steps: int = Field(1000, gt=0)
    tokens: int | None = Field(None, gt=0)
    flops: float | None = Field(None, gt=0)
    time_limit: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    seq_len: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup: float = Field(0.05, ge=0, lt=1)
    decay: float = Field(0.2, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    eval_every: int = Field(100, gt=0)
    eval_bytes: int = Field(65536, gt=0)
    save_every: int = Field(500, gt=0)
    keep_last: int = Field(3, gt=0)
    max_bad_steps: int = Field(5, gt=0)
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    dist_timeout: float = Field(600.0, gt=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    init_from: str | None = None
    carry_state: bool = False
    carry_context: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _schedule(self):
        if self.warmup + (self.decay if self.schedule == "wsd" else 0) > 1:
            raise _KeyedError("decay", f"warmup ({self.warmup}) + decay ({self.decay}) exceed the whole run")
        return self


class Config(Strict):
    """A whole strata configuration file."""

    description: str = ""
    model: AnyModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _bytes_for_aunet(self):
        if isinstance(self.model, AUNetConfig) and self.data.tokenizer != "bytes":
            raise _KeyedError("data.tokenizer", "AU-Net reads bytes and pools them itself; set data.tokenizer: bytes")
        if self.train.carry_state and self.data.document_masking:
            raise _KeyedError("train.carry_state", "a carried state flows across documents; it cannot be combined "
                                                   "with data.document_masking yet")
        return self


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> Config:
    """Read a YAML config (or a dict), apply ``key.sub=value`` overrides, validate.

    Raises ConfigError with a one-line message naming the file and the offending key.
    """
    source = str(path) if path is not None else "<config>"
    if data is None:
        if path is None:
            raise ConfigError("load_config needs a path or data")
        data = read_yaml(Path(path))
    else:
        data = _deep_copy(data)
    for override in overrides or []:
        apply_override(data, override, source)
    return validate_config(data, source)


def validate_config(data: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if not _is_internal_loc(part))
        message = first["msg"].removeprefix("Value error, ")
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyedError):
            key = f"{key}.{cause.key}" if key else cause.key
            message = cause.message
        elif first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        elif "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
        raise ConfigError(f"{source}: {key or '<top level>'}: {message}") from None


MODEL_KINDS = ("lm", "aunet")


def _is_internal_loc(part) -> bool:
    """Parts of a pydantic error location that are not keys of the file (validators, union tags)."""
    return str(part).startswith("function-after") or part in MODEL_KINDS


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A YAML mapping (``safe_load`` rules, a key given twice refused); ConfigError names the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: {'is a directory, not' if path.is_dir() else 'no such'} config file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where}: YAML syntax error: {error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read as YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict, override: str, source: str) -> None:
    """Apply one ``key.sub=value`` override to config data, the value read as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: override {override!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    set_key(data, key.strip(), value, source)


def set_key(data: dict, key: str, value: Any, source: str = "<config>") -> None:
    """Set the dotted ``key`` of config data to a value already parsed (an override's, or one a
    sweep file gives), creating mappings on the way; a number picks a list item."""
    value = _deep_copy(value)  # the caller's value may be set into several configs
    parts = key.split(".")
    node = data
    for index, part in enumerate(parts):
        where = ".".join(parts[: index + 1])
        if isinstance(node, list):  # a list item by number: model.stages.1.d_model=128
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: {where}: {'.'.join(parts[:index])} is a list of {len(node)}; use an index 0..{len(node) - 1}")
            part = int(part)
        if index == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part) if isinstance(node, dict) else node[part]
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"{source}: {where}: is a value, cannot set {key} below it")
        node = child


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def config_to_dict(config: Config) -> dict:
    """The fully resolved config (layout spelled out, defaults filled) as plain data for YAML."""
    return config.model_dump(mode="json")
