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
    """``(cos, sin)`` tables of shape [T, head_dim / 2] for positions ``offset .. offset+T-1``.

    The last tables are kept: every step of a training run asks for the same length.
    """

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(head_dim, rope), persistent=False)
        self._tables: tuple | None = None

    def forward(self, length: int, offset: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or self.inv_freq.device
        key = (length, offset, str(device))
        if self._tables is None or self._tables[0] != key:
            positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq.to(device))
            self._tables = (key, angles.cos(), angles.sin())
        return self._tables[1], self._tables[2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of ``x`` [..., D] (the HF Llama convention) by half-width tables
    broadcastable to [..., D/2]."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
