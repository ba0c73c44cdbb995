"""The intra-layer (head-wise) hybrid mixer of "Hybrid Architectures for Language Models" (Bae et
al., 2025), and the other two-branch designs of that paper's Table 6.

    f(X) = W_out( α_b · Norm(M_b(X))  ⊕  α_a · Norm(M_a(X)) )

Both branches read the same normalised input. ``branches`` picks their mixers, a then b:
``attn_ssm`` is the hybrid (attention, Mamba-2); ``attn_gdn`` the same design with Gated DeltaNet
heads as the linear branch; ``attn_attn`` ("T/T") is the Differential Transformer's pair of
attention maps and ``ssm_ssm`` ("M/M") Differential Mamba's pair of Mamba-2 mixers. A branch takes
the shape of its kind's section (``hybrid.attention``, ``hybrid.mamba`` or ``hybrid.gdn``).
Every other design axis the paper explored is a setting of HybridConfig: branch norm, scaling α,
fusion ⊕ (diff is b − a: ssm − attn for the hybrid, gdn − attn for attn_gdn), value sharing
(attn_ssm only), joint or separate output projection. The defaults are the paper's final recipe:
GroupNorm, no scaling, subtraction, separate projections.

Two scalings come from other papers:
- ``lambda``, the Differential Transformer's (Ye et al. 2024, §2.1): b − λ·a with
  λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, λ_init = 0.8 − 0.6·exp(−0.3·(l − 1)) at layer l,
  the vectors drawn from N(0, 0.1²) and as wide as a head of branch a; and the output scaled by
  (1 − λ_init). Diff-T normalises the difference; here, as in every design of the general form
  above, each branch is normalised before fusion, so (1 − λ_init) scales both branches.
  Differential Mamba (Schneider et al. 2025) also normalises the difference and uses its own
  λ = sigmoid(Σ λ_q) + λ_init; its M/M design here takes the general form and any scaling.
- ``alpha``, the learned mix of the hybrid paper's Appendix Q: α·b + (1 − α)·a (α·Mamba +
  (1 − α)·attention), one unconstrained scalar α per layer. It starts at 0.5, both branches
  weighed alike: our choice, the paper's appendix was not at hand when this was written.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn

from strata.config import HybridConfig
from strata.nn.attention import Attention
from strata.nn.gated_deltanet import GatedDeltaNet
from strata.nn.linear import project
from strata.nn.mamba2 import Mamba2
from strata.nn.norms import HeadGroupNorm

ALPHA_INIT = 0.5
LAMBDA_STD = 0.1
LAMBDA_VECTORS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def branch_names(branches: str) -> tuple[str, str]:
    """Module names of branches a and b: ``attn`` and ``ssm`` for the hybrid (the names its
    checkpoints have always used; ``attn`` and ``gdn`` beside Gated DeltaNet), numbered when both
    are of one kind (``attn1``, ``attn2``)."""
    first, second = branches.split("_")
    return (first, second) if first != second else (f"{first}1", f"{second}2")


# Every design's per-branch output projections write into the residual stream (strata.models.lm
# gives them the smaller initialisation).
OUTPUT_PROJECTIONS = tuple(
    f"{name}_out" for branches in get_args(HybridConfig.model_fields["branches"].annotation) for name in branch_names(branches)
)


def lambda_init(layer: int) -> float:
    """Diff-T's λ_init at 1-indexed ``layer``: deeper layers subtract more at the start."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def diff_lambda(q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, init: float) -> torch.Tensor:
    """Diff-T's re-parameterised λ from its four vectors and λ_init; a function of the weights
    alone, so a report can read λ from a checkpoint without building the model."""
    return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + init


class IntraLayerHybrid(nn.Module):
    """The two-branch mixer; ``layer`` (1-indexed in its stack) sets λ_init of the lambda scaling."""

    # The children built after the scalings drew their parameters (see strata.models.init).
    built_after_reset = (*OUTPUT_PROJECTIONS, "out_proj")

    def __init__(self, d_model: int, config: HybridConfig, norm_eps: float = 1e-5, layer: int = 1):
        super().__init__()
        self.config = config
        self.names = branch_names(config.branches)
        for name, kind in zip(self.names, config.branch_kinds, strict=True):
            if kind == "attention":
                branch = Attention(d_model, config.attention, output_projection=False)
            elif kind == "gdn":
                branch = GatedDeltaNet(d_model, config.gdn, norm_eps, output_projection=False)
            else:
                # Value sharing (hybrid only) feeds the attention's values to the Mamba branch as x.
                branch = Mamba2(d_model, config.mamba, norm_eps, external_x=config.share_value, output_projection=False)
            setattr(self, name, branch)
        first, second = self.branch_modules()
        widths = [branch.d_ssm if isinstance(branch, Mamba2) else branch.value_width for branch in (first, second)]

        for name, branch, width in zip(self.names, (first, second), widths):
            norm = HeadGroupNorm(width, branch.n_heads, norm_eps) if config.norm == "group" else nn.Identity()
            setattr(self, f"{name}_norm", norm)
            if config.scale == "vector":
                setattr(self, f"{name}_scale", nn.Parameter(torch.empty(width)))

        if config.scale == "scalar":
            # One learnable scalar on branch a (the attention of the hybrid), relative to b.
            setattr(self, f"{self.names[0]}_scale", nn.Parameter(torch.empty(1)))
        elif config.scale == "gate":
            # Input-dependent sigmoid gate per head of each branch.
            self.gate = nn.Linear(d_model, first.n_heads + second.n_heads, bias=True)
        elif config.scale == "lambda":
            self.lambda_init = lambda_init(layer)
            for key in LAMBDA_VECTORS:
                setattr(self, key, nn.Parameter(torch.empty(first.head_dim)))
        elif config.scale == "alpha":
            self.alpha = nn.Parameter(torch.empty(()))
        self.reset_parameters()

        # Created last, as they always were, so a seed gives the hybrid's designs the same weights
        # (after the scalings drew theirs: built_after_reset).
        if config.out_proj == "separate":
            for name, width in zip(self.names, widths):
                setattr(self, f"{name}_out", nn.Linear(width, d_model, bias=False))
        else:
            self.out_proj = nn.Linear(sum(widths) if config.fusion == "concat" else widths[1], d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The scalings' own parameters: vector and scalar scales 1, Diff-T's λ vectors drawn from
        N(0, LAMBDA_STD²), α = ALPHA_INIT. The branches, norms and projections reset themselves."""
        scale = self.config.scale
        if scale in ("vector", "scalar"):
            for name in self.names:
                if hasattr(self, f"{name}_scale"):
                    nn.init.ones_(getattr(self, f"{name}_scale"))
        elif scale == "lambda":
            for key in LAMBDA_VECTORS:
                vector = getattr(self, key)
                vector.copy_(torch.randn(vector.shape, device=vector.device) * LAMBDA_STD)
        elif scale == "alpha":
            self.alpha.fill_(ALPHA_INIT)

    def branch_modules(self) -> tuple[nn.Module, nn.Module]:
        """The mixers of branches a and b."""
        return getattr(self, self.names[0]), getattr(self, self.names[1])

    def diff_lambda(self) -> torch.Tensor:
        return diff_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)

    def branches(self, x: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None):
        """The two normalised, scaled branch outputs (a, b), each [B, T, width]; ``cache`` is a
        HybridCache when decoding; ``segment_ids`` [B, T] packed documents."""
        first, second = self.branch_modules()
        first_cache, second_cache = (None, None) if cache is None else cache.branches
        x_a, x_b = (x * m if m != 1 else x for m in self.config.in_multipliers)
        if self.config.share_value:
            # The SSM branch reads the attention's values, one head of V per SSM head.
            y_a, values = first.attend(x_a, return_values=True, cache=first_cache, segment_ids=segment_ids)
            groups = first.n_heads // first.n_kv_heads  # values [B, kv, T, dv]
            shared = values.repeat_interleave(groups, dim=1).transpose(1, 2).flatten(-2)
            y_b = second.mix(x_b, shared, cache=second_cache, segment_ids=segment_ids)
        else:
            y_a, y_b = (run_branch(branch, branch_x, branch_cache, segment_ids)
                        for branch, branch_x, branch_cache in ((first, x_a, first_cache), (second, x_b, second_cache)))
        norm_a, norm_b = (getattr(self, f"{name}_norm") for name in self.names)
        return self.scaled(x, norm_a(y_a), norm_b(y_b))

    def scaled(self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised branch outputs (a, b) weighed by ``hybrid.scale``; ``x`` drives a gate."""
        scale, (name_a, name_b) = self.config.scale, self.names
        if scale == "vector":
            return y_a * getattr(self, f"{name_a}_scale"), y_b * getattr(self, f"{name_b}_scale")
        if scale == "scalar":
            return y_a * getattr(self, f"{name_a}_scale"), y_b
        if scale == "gate":
            first, second = self.branch_modules()
            gates = torch.sigmoid(project(self.gate, x))
            gate_a, gate_b = gates.split([first.n_heads, second.n_heads], dim=-1)
            return per_head(y_a, gate_a), per_head(y_b, gate_b)
        if scale == "lambda":
            keep = 1 - self.lambda_init
            return y_a * (self.diff_lambda() * keep), y_b * keep
        if scale == "alpha":
            return y_a * (1 - self.alpha), y_b * self.alpha
        return y_a, y_b

    def forward(self, x: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        y_a, y_b = self.branches(x, cache, segment_ids)
        if self.config.out_proj == "separate":
            y_a, y_b = (project(getattr(self, f"{name}_out"), y) for name, y in zip(self.names, (y_a, y_b)))
        # Constants on each branch's output (Falcon-H1's μP multipliers); linear, so they commute
        # with a joint projection.
        y_a, y_b = (y * m if m != 1 else y for y, m in zip((y_a, y_b), self.config.out_multipliers))
        fusion = self.config.fusion
        if fusion == "add":
            fused = y_b + y_a
        elif fusion == "diff":
            fused = y_b - y_a
        else:
            fused = torch.cat([y_b, y_a], dim=-1)
        return fused if self.config.out_proj == "separate" else project(self.out_proj, fused)


def run_branch(branch: nn.Module, x: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """A branch's heads before any projection."""
    if isinstance(branch, Attention):
        return branch.attend(x, cache=cache, segment_ids=segment_ids)
    return branch.mix(x, cache=cache, segment_ids=segment_ids)


def per_head(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y [B, T, heads·d] with each head scaled by its gate [B, T, heads]."""
    return (y.unflatten(-1, (gate.shape[-1], -1)) * gate[..., None]).flatten(-2)
