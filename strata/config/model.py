"""A stack of blocks from its layout (``ModelConfig``, a language model; ``StageConfig``, an AU-Net
stage) and the checks that its sections fit its layout."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from strata.config.base import Strict, _KeyedError
from strata.config.blocks import (
    BRANCH_WIDTHS,
    AttentionConfig,
    FFNConfig,
    GatedDeltaNetConfig,
    HybridConfig,
    KimiDeltaConfig,
    Mamba2Config,
    SlidingWindowConfig,
)
from strata.layout import BLOCK_SYMBOLS, PLACEMENTS, check_layout, make_layout


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
    kda: KimiDeltaConfig | None = None
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
        needs = {"A": "attention", "W": "attention", "M": "mamba", "G": "gdn", "K": "kda", "H": "hybrid"}
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
