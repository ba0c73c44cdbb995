"""Normalisation layers: RMSNorm, the gated group RMSNorm of Mamba-2, and per-head GroupNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean square of a wide vector loses bits.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z))`` computed per group of channels (Mamba-2's norm, gate before norm)."""

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        gated = y.float() * F.silu(z.float())
        grouped = gated.unflatten(-1, (self.n_groups, -1))
        normed = F.rms_norm(grouped, (grouped.shape[-1],), eps=self.eps).flatten(-2)
        return (normed * self.weight.float()).to(dtype)


class HeadGroupNorm(nn.Module):
    """GroupNorm over each head's channels at every position (mean and variance per head), with a
    per-channel affine; the branch norm of the intra-layer hybrid (as in Hymba)."""

    def __init__(self, dim: int, n_groups: int, eps: float = 1e-5):
        super().__init__()
        self.n_groups = n_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.float().reshape(-1, x.shape[-1])
        out = F.group_norm(flat, self.n_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.reshape(x.shape).to(x.dtype)
