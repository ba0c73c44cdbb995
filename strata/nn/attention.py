"""Grouped-query causal self-attention with RoPE, optionally over a sliding window plus sink tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import AttentionConfig, RopeConfig
from strata.nn.rope import RotaryEmbedding, apply_rotary


def window_mask(length: int, window: int, sinks: int, device=None) -> torch.Tensor:
    """Boolean [T, T] mask: query i sees key j when j <= i and (i - j < window or j < sinks)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


class Attention(nn.Module):
    """GQA attention. Q/K heads are ``head_dim`` wide, V heads ``v_head_dim`` (the intra-layer
    hybrid widens V); with ``window`` set, each query sees the last ``window`` keys and the first
    ``sinks`` keys of the sequence.

    ``attend`` returns the concatenated heads
    [B, T, n_heads * v_head_dim] before the output projection, so the hybrid mixer can fuse
    branches before (or after) projecting.
    """

    def __init__(
        self,
        d_model: int,
        config: AttentionConfig,
        window: int | None = None,
        sinks: int = 0,
        rope: RopeConfig | None = None,
        output_projection: bool = True,
    ):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.v_head_dim = config.value_head_dim
        self.window = window
        self.sinks = sinks
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(self.value_width, d_model, bias=False) if output_projection else None
        self.rotary = RotaryEmbedding(self.head_dim, rope or config.rope)

    @property
    def value_width(self) -> int:
        return self.n_heads * self.v_head_dim

    def attend(self, x: torch.Tensor, return_values: bool = False):
        """Heads [B, T, n_heads * v_head_dim]; with ``return_values`` also V [B, n_kv_heads, T, v_head_dim]."""
        batch, length, _ = x.shape
        cos, sin = self.rotary(length, device=x.device)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads of [B, T, heads, D]
        q = apply_rotary(self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin).transpose(1, 2)
        k = apply_rotary(self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.v_head_dim)).transpose(1, 2)
        gqa = self.n_heads != self.n_kv_heads
        if self.window is None or self.window + self.sinks >= length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = window_mask(length, self.window, self.sinks, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(batch, length, self.value_width)
        return (out, v) if return_values else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(x))
