"""Grouped-query causal self-attention with RoPE, optionally over a sliding window plus sink tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import AttentionConfig, RopeConfig
from strata.nn.linear import project
from strata.nn.norms import RMSNorm, rms_norm
from strata.nn.rope import RotaryEmbedding, apply_rotary


def window_mask(length: int, window: int, sinks: int, device=None) -> torch.Tensor:
    """Boolean [T, T] mask: query i sees key j when j <= i and (i - j < window or j < sinks)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each step within its segment (0 at each segment's first step)."""
    positions = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return positions - torch.where(starts, positions, 0).cummax(dim=1).values


def segment_mask(segment_ids: torch.Tensor, window: int | None = None, sinks: int = 0) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask of packed documents: query i sees key j of its own segment when
    j <= i (and, with a window, i - j < window or j is among the first ``sinks`` of its segment)."""
    positions = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    i, j = positions[:, None], positions[None, :]
    allowed = (j <= i) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if window is not None:
        sink = (segment_positions(segment_ids) < sinks)[:, None, :]
        allowed &= (i - j < window) | sink
    return allowed[:, None]


class Attention(nn.Module):
    """GQA attention. Q/K heads are ``head_dim`` wide, V heads ``v_head_dim`` (the intra-layer
    hybrid widens V); with ``window`` set, each query sees the last ``window`` keys and the first
    ``sinks`` keys of the sequence.

    Q, K and V come from one projection, and the Q and K heads, side by side, take one rotation:
    three calls become one, which matters when decoding a token is a chain of small ops (training
    time measured the same).

    RoPE rotates the first ``rope.fraction`` of each Q/K head's channels; with ``rope: null`` the
    attention has no positional encoding (NoPE). ``softmax_scale`` replaces 1/sqrt(head_dim).
    With ``output_gate`` the projection also makes a gate per output channel, and the heads'
    output is multiplied by its sigmoid (Qwen3-Next's gated attention). ``qk_norm`` RMSNorms the
    new queries and keys (``q_norm``, ``k_norm``, epsilon ``norm_eps``) before they are rotated,
    so cached and carried keys are stored normalised, as the full forward computes them.

    ``attend`` returns the concatenated heads
    [B, T, n_heads * v_head_dim] before the output projection, so the hybrid mixer can fuse
    branches before (or after) projecting.

    With a ``cache`` (from ``strata.inference.cache``) the input holds only the new steps: RoPE
    takes the cache's per-sequence positions, and the cache stores the new keys and values and
    returns everything to attend over with the mask that padding, windows and sinks call for.
    """

    def __init__(
        self,
        d_model: int,
        config: AttentionConfig,
        window: int | None = None,
        sinks: int = 0,
        rope: RopeConfig | None = None,
        output_projection: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.v_head_dim = config.value_head_dim
        self.window = window
        self.sinks = sinks
        self.softmax_scale = config.softmax_scale  # None: SDPA's 1/sqrt(head_dim)
        # Rows of Q, K and V in ``qkv_proj.weight``, in that order (then the output gate's, if any).
        self.qkv_widths = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.v_head_dim)
        self.gate_width = self.n_heads * self.v_head_dim if config.output_gate else 0
        self.qkv_proj = nn.Linear(d_model, sum(self.qkv_widths) + self.gate_width, bias=config.bias)
        self.o_proj = nn.Linear(self.value_width, d_model, bias=config.bias) if output_projection else None
        rope = rope or config.rope
        # RoPE rotates the first rotary_dim channels of each head; None: no positional encoding.
        self.rotary_dim = 0 if rope is None else int(self.head_dim * rope.fraction)
        self.rotary = RotaryEmbedding(self.rotary_dim, rope) if rope is not None else None
        # ``qk_norm``: one weight per head channel shared by the heads, or one per projected channel.
        self.qk_norm = None if config.qk_norm == "none" else config.qk_norm
        q_norm_width, k_norm_width = (self.head_dim,) * 2 if config.qk_norm == "head" else self.qkv_widths[:2]
        self.q_norm = RMSNorm(q_norm_width, norm_eps) if self.qk_norm else None
        self.k_norm = RMSNorm(k_norm_width, norm_eps) if self.qk_norm else None

    @property
    def value_width(self) -> int:
        return self.n_heads * self.v_head_dim

    def attend(self, x: torch.Tensor, return_values: bool = False, cache=None, segment_ids: torch.Tensor | None = None):
        """Heads [B, T, n_heads * v_head_dim]; with ``return_values`` also the new steps' V
        [B, n_kv_heads, T, v_head_dim]. ``segment_ids`` [B, T]: packed documents, each attending
        within itself only, its RoPE positions counted from its own start (as when run alone)."""
        batch, length, _ = x.shape
        # (split_with_sizes: Tensor.split's Python wrapper costs as much as the split itself.)
        q_width, k_width, v_width = self.qkv_widths
        if self.gate_width:
            qk, v, gate = project(self.qkv_proj, x).split_with_sizes([q_width + k_width, v_width, self.gate_width], dim=-1)
        else:
            qk, v = project(self.qkv_proj, x).split_with_sizes([q_width + k_width, v_width], dim=-1)
        if self.qk_norm is not None:
            qk = self._normed(qk)
        qk = qk.view(batch, length, self.n_heads + self.n_kv_heads, self.head_dim)
        qk = self._rotated(qk, cache, segment_ids).transpose(1, 2)
        q, k = qk.split_with_sizes([self.n_heads, self.n_kv_heads], dim=1)
        v = v.view(batch, length, self.n_kv_heads, self.v_head_dim).transpose(1, 2)
        gqa = self.n_heads != self.n_kv_heads
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids apply to a whole-sequence forward, not to a cached one")
            mask = segment_mask(segment_ids, self.window, self.sinks)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.softmax_scale)
        elif cache is not None:
            keys, values, mask = cache.update(k, v)
            if length == 1:
                out = self._attend_one_step(q, keys, values, mask)
            else:
                causal = mask is None
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                                     scale=self.softmax_scale)
        elif self.window is None or self.window + self.sinks >= length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.softmax_scale)
        else:
            mask = window_mask(length, self.window, self.sinks, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.softmax_scale)
        out = out.transpose(1, 2).reshape(batch, length, self.value_width)
        if self.gate_width:
            out = out * torch.sigmoid(gate)
        return (out, v) if return_values else out

    def _normed(self, qk: torch.Tensor) -> torch.Tensor:
        """Q and K side by side [B, T, q_width + k_width], each RMS-normalised per head or over its
        whole width (``qk_norm``); returned as [B, T, heads, head_dim] or as given, to be viewed so."""
        q, k = qk.split_with_sizes(self.qkv_widths[:2], dim=-1)
        if self.qk_norm == "head":
            q, k = q.unflatten(-1, (self.n_heads, self.head_dim)), k.unflatten(-1, (self.n_kv_heads, self.head_dim))
        q = rms_norm(q, self.q_norm.weight, self.q_norm.eps)
        k = rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        return torch.cat([q, k], dim=-2 if self.qk_norm == "head" else -1)

    def _rotated(self, qk: torch.Tensor, cache, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Q and K heads side by side [B, T, heads, D], rotated at their positions (within their
        segment, with ``segment_ids``): the first ``rotary_dim`` channels of each head (all of
        them, usually; none without RoPE)."""
        if self.rotary is None:
            return qk
        if segment_ids is not None:
            cos, sin = (table[:, :, None] for table in self.rotary.at(segment_positions(segment_ids), qk.shape[1]))
        elif cache is None:
            cos, sin = self.rotary(qk.shape[1], device=qk.device)
            cos, sin = cos[:, None], sin[:, None]  # broadcast over the heads of [B, T, heads, D]
        else:
            cos, sin = cache.sequence.rope(self.rotary)  # [B|1, T, 1, D]
        if self.rotary_dim == self.head_dim:
            return apply_rotary(qk, cos, sin)
        rotated, passed = qk.split_with_sizes([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
        return torch.cat([apply_rotary(rotated, cos, sin), passed], dim=-1)

    def _attend_one_step(self, q, keys, values, mask) -> torch.Tensor:
        """Attention of one new query per head [B, heads, 1, D] over the cached steps.

        The query heads that share a KV head sit in the query axis of that KV head, so no K/V is
        expanded (1.5x faster at 16K keys). With values wider than keys (the intra-layer hybrid)
        CPU SDPA falls back to a kernel that copies K and V; the plain product is then ~2.7x
        faster at 16K keys.
        """
        batch, groups = q.shape[0], self.n_heads // self.n_kv_heads
        grouped = q.reshape(batch, self.n_kv_heads, groups, self.head_dim)
        if self.v_head_dim == self.head_dim:
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.softmax_scale)
        else:
            scale = self.softmax_scale or self.head_dim**-0.5
            scores = (grouped * scale) @ keys.transpose(-1, -2)  # [B, kv, groups, S]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values  # fp32 like SDPA
        return out.view(batch, self.n_heads, 1, self.v_head_dim)

    def forward(self, x: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return project(self.o_proj, self.attend(x, cache=cache, segment_ids=segment_ids))
