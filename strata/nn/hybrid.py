"""The intra-layer (head-wise) hybrid mixer of brief §5.

    f(X) = W_out( α_ssm · Norm(M_ssm(X))  ⊕  α_attn · Norm(M_attn(X)) )

Both branches read the same normalised input. Every design axis the paper explored is a
setting of HybridConfig: branch norm, scaling α, fusion ⊕, value sharing, joint or separate
output projection, and the branch widths. The defaults are the paper's final recipe: GroupNorm,
no scaling, subtraction (ssm − attn), separate projections.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.config import HybridConfig
from strata.nn.attention import Attention
from strata.nn.linear import project
from strata.nn.mamba2 import Mamba2
from strata.nn.norms import HeadGroupNorm


class IntraLayerHybrid(nn.Module):
    def __init__(self, d_model: int, config: HybridConfig, norm_eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.attn = Attention(d_model, config.attention, output_projection=False)
        self.ssm = Mamba2(d_model, config.mamba, norm_eps, external_x=config.share_value, output_projection=False)
        attn_width, ssm_width = self.attn.value_width, self.ssm.d_ssm

        if config.norm == "group":
            self.attn_norm = HeadGroupNorm(attn_width, self.attn.n_heads, norm_eps)
            self.ssm_norm = HeadGroupNorm(ssm_width, self.ssm.n_heads, norm_eps)
        else:
            self.attn_norm = self.ssm_norm = nn.Identity()

        if config.scale == "vector":
            self.attn_scale = nn.Parameter(torch.ones(attn_width))
            self.ssm_scale = nn.Parameter(torch.ones(ssm_width))
        elif config.scale == "scalar":
            # One learnable scalar on the attention branch, relative to the SSM branch.
            self.attn_scale = nn.Parameter(torch.ones(1))
        elif config.scale == "gate":
            # Input-dependent sigmoid gate per head of each branch.
            self.gate = nn.Linear(d_model, self.attn.n_heads + self.ssm.n_heads, bias=True)

        if config.out_proj == "separate":
            self.attn_out = nn.Linear(attn_width, d_model, bias=False)
            self.ssm_out = nn.Linear(ssm_width, d_model, bias=False)
        else:
            fused_width = attn_width + ssm_width if config.fusion == "concat" else ssm_width
            self.out_proj = nn.Linear(fused_width, d_model, bias=False)

    def branches(self, x: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two normalised, scaled branch outputs (attention [B,T,attn_width], ssm [B,T,d_ssm]);
        ``cache`` is a HybridCache when decoding."""
        attn_cache, ssm_cache = (None, None) if cache is None else (cache.attention, cache.mamba)
        if self.config.share_value:
            # The SSM branch reads the attention's values, one head of V per SSM head.
            y_attn, values = self.attn.attend(x, return_values=True, cache=attn_cache)  # values [B, kv, T, dv]
            groups = self.attn.n_heads // self.attn.n_kv_heads
            shared = values.repeat_interleave(groups, dim=1).transpose(1, 2).flatten(-2)
            y_ssm = self.ssm.mix(x, shared, cache=ssm_cache)
        else:
            y_attn = self.attn.attend(x, cache=attn_cache)
            y_ssm = self.ssm.mix(x, cache=ssm_cache)
        y_attn, y_ssm = self.attn_norm(y_attn), self.ssm_norm(y_ssm)
        scale = self.config.scale
        if scale == "vector":
            y_attn, y_ssm = y_attn * self.attn_scale, y_ssm * self.ssm_scale
        elif scale == "scalar":
            y_attn = y_attn * self.attn_scale
        elif scale == "gate":
            gates = torch.sigmoid(project(self.gate, x))
            attn_gate, ssm_gate = gates.split([self.attn.n_heads, self.ssm.n_heads], dim=-1)
            y_attn = (y_attn.unflatten(-1, (self.attn.n_heads, -1)) * attn_gate[..., None]).flatten(-2)
            y_ssm = (y_ssm.unflatten(-1, (self.ssm.n_heads, -1)) * ssm_gate[..., None]).flatten(-2)
        return y_attn, y_ssm

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        y_attn, y_ssm = self.branches(x, cache)
        if self.config.out_proj == "separate":
            y_attn, y_ssm = project(self.attn_out, y_attn), project(self.ssm_out, y_ssm)
        fusion = self.config.fusion
        if fusion == "add":
            fused = y_ssm + y_attn
        elif fusion == "diff":
            fused = y_ssm - y_attn
        else:
            fused = torch.cat([y_ssm, y_attn], dim=-1)
        return fused if self.config.out_proj == "separate" else project(self.out_proj, fused)
