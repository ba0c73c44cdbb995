"""Rotary position embeddings with optional Llama-3 frequency scaling (rotate-half convention)."""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.config import RopeConfig


def rope_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``, rescaled per Llama-3 when ``rope.scaling`` is set.

    Llama-3 scaling divides wavelengths longer than ``original_context / low_freq_factor`` by
    ``factor``, keeps those shorter than ``original_context / high_freq_factor``, and blends
    linearly (in frequency) between the two.
    """
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = rope.scaling
    if scaling is None:
        return inv_freq.float()
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = scaling.original_context / scaling.low_freq_factor
    high_wavelength = scaling.original_context / scaling.high_freq_factor
    smooth = (scaling.original_context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_wavelength, inv_freq / scaling.factor, blended)
    scaled = torch.where(wavelength < high_wavelength, inv_freq, scaled)
    return scaled.float()


class RotaryEmbedding(nn.Module):
    """Produces ``(cos, sin)`` tables of shape [T, head_dim] for positions ``offset .. offset+T-1``."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(head_dim, rope), persistent=False)

    def forward(self, length: int, offset: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(offset, offset + length, device=device or self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.to(positions.device))
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the tables [T, D]; pairs are (i, i + D/2) as in HF Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
