"""Dynamic chunking, H-Net's learned splitting ("Dynamic Chunking for End-to-End Hierarchical
Sequence Modeling", Hwang et al., 2025), as AU-Net's ``split: {rule: learned}``.

Between stage k and stage k+1 a router scores each stage-k position t from the encoder's states:

    p_t = (1 − cos(W_q x_t, W_k x_{t−1})) / 2,    b_t = [p_t >= 0.5]

so a boundary falls where adjacent states differ: the stage-(k+1) positions are those with
b_t = 1 (with BOS and every document start, which split at every stage whatever p says). A
boundary at t is decided from x_t and x_{t−1}, which have seen bytes <= t: causal, so decoding
decides it the moment the byte arrives (the last key is kept between calls).

Three things let the discrete choice learn, all from H-Net:
  * smoothing: the deeper stage's outputs z_j at the boundaries are mixed into an exponential
    moving average before they are spread back up, z̄_j = P_j z_j + (1 − P_j) z̄_{j−1} with P_j the
    boundary's p (a scan: ``strata.nn.ssd.linear_recurrence``), so a boundary of low confidence
    leans on the segment before it;
  * the straight-through confidence: each stage-k output is multiplied by c_t + sg(1 − c_t), where
    c_t = p_t at a boundary and 1 − p_t elsewhere: 1 in the forward pass, c_t's gradient backward;
  * the ratio loss, which holds the fraction F of positions chosen and the mean probability G
    near 1/N for a target of N positions per deeper one:
        L = N / (N − 1) · ((N − 1) F G + (1 − F)(1 − G)),
    over the positions that are neither padding nor forced splits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.nn.ssd import RESET_LOG_DECAY, linear_recurrence


class Router(nn.Module):
    """Scores every position of a stage: the probability that it starts a deeper segment. W_q and
    W_k start as the identity (``reset_parameters``), as H-Net's do: at first a boundary falls
    where adjacent states point apart."""

    def __init__(self, width: int):
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for projection in (self.q_proj, self.k_proj):
                projection.weight.copy_(torch.eye(projection.weight.shape[0], dtype=projection.weight.dtype))

    def forward(self, x: torch.Tensor, previous_key: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (p [B, T] in fp32, the last position's key [B, 1, d] for the next call).
        Without ``previous_key`` the first position has none: its p is 1 (the first position of a
        sequence splits at every stage in any case)."""
        keys = self.k_proj(x)
        if previous_key is None:
            queries, before = self.q_proj(x[:, 1:]), keys[:, :-1]
        else:
            queries, before = self.q_proj(x), torch.cat([previous_key, keys[:, :-1]], 1)
        p = ((1 - F.cosine_similarity(queries.float(), before.float(), dim=-1)) / 2).clamp(0, 1)
        if previous_key is None:
            p = F.pad(p, (1, 0), value=1.0)
        return p, keys[:, -1:]


class Chunking:
    """One stage's learned split: the router's ``p`` [B, T], the ``chosen`` boundaries [B, T] and
    which positions count for the ratio loss (``free``: neither padding nor a forced split)."""

    def __init__(self, p: torch.Tensor, levels: torch.Tensor, depth: int):
        levels = levels.to(p.device)
        forced = levels >= depth
        self.free = (levels >= 0) & ~forced
        self.chosen = forced | (p >= 0.5)
        self.p = torch.where(forced, torch.ones_like(p), p)
        # The levels the route reads: forced splits keep theirs (deeper stages see them too).
        self.levels = torch.where(self.free & self.chosen, depth, levels)

    def smooth(self, outputs: torch.Tensor, split_p: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """z̄_j = P_j z_j + (1 − P_j) z̄_{j−1} over the deeper stage's ``outputs`` [B, N, d] at the
        boundaries, whose probabilities are ``split_p`` [B, N]; ``before`` [B, 1, d]: z̄ of the
        boundary before them (decoding), or None (the sequence starts at a forced split, P = 1)."""
        # P = 1 (forced) decays to exactly 0 through RESET_LOG_DECAY; elsewhere P < 1.
        log_keep = torch.where(split_p >= 1, -RESET_LOG_DECAY, torch.log1p(-split_p.clamp(max=1 - 1e-6)))
        initial = None if before is None else before[:, 0].float()
        smoothed, _ = linear_recurrence(outputs.float() * split_p[..., None], log_keep, initial)
        return smoothed.to(outputs.dtype)

    def confident(self, up: torch.Tensor) -> torch.Tensor:
        """The upsampled output [B, T, d] times c + sg(1 − c): unchanged, with c's gradient."""
        c = torch.where(self.chosen, self.p, 1 - self.p)
        return up * (c + (1 - c).detach()).to(up.dtype)[..., None]

    def rate(self) -> torch.Tensor:
        """F: the share of the free positions chosen (1 when none is free), detached."""
        count = self.free.sum()
        return ((self.chosen & self.free).sum() / count if count else self.p.new_ones(())).detach()

    def ratio_loss(self, target: float) -> torch.Tensor:
        """H-Net's ratio loss for ``target`` positions of this stage per deeper one (0 when no
        position is free)."""
        free = self.free
        count = free.sum()
        if count == 0:
            return self.p.new_zeros(())
        chosen = (self.chosen & free).sum() / count  # F
        mean_p = (self.p * free).sum() / count  # G
        return target / (target - 1) * ((target - 1) * chosen * mean_p + (1 - chosen) * (1 - mean_p))
