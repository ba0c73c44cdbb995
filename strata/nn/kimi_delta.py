"""The Kimi Delta Attention mixer (Kimi Linear, Kimi Team 2025), as transformers' ``kimi_linear``
and fla define it: Gated DeltaNet whose decay is a vector, one value per key channel, computed
from a low-rank projection; the output gated by sigmoid, also through a low-rank projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import KimiDeltaConfig
from strata.nn.gated_deltanet import DeltaRuleMixer
from strata.nn.linear import project
from strata.nn.norms import HeadGatedRMSNorm


class KimiDeltaAttention(DeltaRuleMixer):
    """The in-projection is laid out as [q, k, v, f, b, o]: the conv's input (q, k, v, each
    ``n_heads · head_dim``), the decay's low-rank input f and the output gate's o (``head_dim``
    each, raised to every channel by ``f_b_proj`` and ``g_b_proj``) and β's logits b (one a head).

    Per step and head, with α_t = exp(−exp(A_log)·softplus(f_b(f_t) + dt_bias)) a vector over the
    key channels: S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t; the
    output is RMSNorm(o_t) · sigmoid(g_b(o-gate_t)) per head, then out-projected.
    """

    def __init__(self, d_model: int, config: KimiDeltaConfig, norm_eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.n_heads, self.head_dim, self.v_head_dim = config.n_heads, config.head_dim, config.head_dim
        self.width = config.width
        self.conv_dim = 3 * self.width
        self.chunk_size = config.chunk_size
        # Widths of the conv input (q, k, v), the decay's and the output gate's low-rank inputs, and b.
        self.projection_widths = (self.conv_dim, self.head_dim, self.head_dim, self.n_heads)
        self.in_proj = nn.Linear(d_model, sum(self.projection_widths), bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, self.width, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, self.width, bias=False)
        # An nn.Conv1d only to hold the weights under the names and shapes fla and HF use.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.conv_bias)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.width))
        self.norm = HeadGatedRMSNorm(self.head_dim, config.norm_eps or norm_eps, gate="sigmoid")
        self.out_proj = nn.Linear(self.width, d_model, bias=False)
        self.reset_parameters()  # after every child: the order construction draws in (strata.models.init)

    def _project(self, u: torch.Tensor):
        qkv, f, o_gate, b = project(self.in_proj, u).split_with_sizes(self.projection_widths, dim=-1)
        return qkv, (f, o_gate, b)

    def _rule_inputs(self, conv: torch.Tensor, gates, A: torch.Tensor, dt_bias: torch.Tensor):
        """q, k, v [B, T, n_heads, head_dim], log-decays g [B, T, n_heads, head_dim] and β [B, T, n_heads]."""
        f, _, b = gates
        q, k, v = self._qk(conv, self.n_heads)
        decay_input = (project(self.f_b_proj, f).float() + dt_bias).unflatten(-1, (self.n_heads, self.head_dim))
        g = A[:, None] * F.softplus(decay_input)
        return q, k, v, g, torch.sigmoid(b.float())

    def _gated_output(self, o: torch.Tensor, gates) -> torch.Tensor:
        gate = project(self.g_b_proj, gates[1]).unflatten(-1, (self.n_heads, self.head_dim))
        return self.norm(o, gate).flatten(-2)
