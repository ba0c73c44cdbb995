"""Rotary position embeddings with optional Llama-3 frequency scaling (rotate-half convention)."""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.config import RopeConfig


def rope_frequencies(head_dim: int, rope: RopeConfig, device=None) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``, rescaled per Llama-3 when ``rope.scaling`` is set;
    computed on ``device`` (by default torch's current default device).

    Llama-3 scaling divides wavelengths longer than ``original_context / low_freq_factor`` by
    ``factor``, keeps those shorter than ``original_context / high_freq_factor``, and blends
    linearly (in frequency) between the two.
    """
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
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
    """Full-width ``(cos, sin)`` tables for ``apply_rotary``: cos of each frequency twice, and sin
    with the first half negated, so the rotation is three elementwise ops.

    One table covers positions 0 .. N−1 and grows (in steps of ``GROWTH``) when a longer
    sequence asks; training and decoding then only slice or index it.
    """

    GROWTH = 1024

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.head_dim, self.rope = head_dim, rope
        self.register_buffer("inv_freq", torch.empty((head_dim + 1) // 2), persistent=False)
        # Layers with equal settings have equal tables; a decoding step looks them up once.
        self.key = ("rope", head_dim, rope.model_dump_json())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The frequencies, computed on the buffer's device; the tables follow when first asked for."""
        with torch.no_grad():
            self.inv_freq.copy_(rope_frequencies(self.head_dim, self.rope, device=self.inv_freq.device))
        self._cos = self._sin = None

    def _tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device) if device is not None else self.inv_freq.device
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            size = -(-length // self.GROWTH) * self.GROWTH
            # Ordinary tensors even when generation (inference mode) grows the table: training
            # reuses it and must be able to save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)
                cos, sin = angles.cos(), angles.sin()
                self._cos, self._sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        return self._cos, self._sin

    def reserve(self, length: int, device=None) -> None:
        """Have the tables cover ``length`` positions now, so that decoding never grows them
        (growing them inside a compiled step would recompile it)."""
        self._tables(length, device)

    def forward(self, length: int, start: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [T, head_dim] for positions start .. start+T−1."""
        cos, sin = self._tables(start + length, device)
        return cos[start : start + length], sin[start : start + length]

    def at(self, positions: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [..., head_dim] for a tensor of positions below ``bound`` (negative ones, padding,
        read position 0). The caller knows the bound, so no value is read back from the tensor
        (which would also split a compiled decoding step in two)."""
        cos, sin = self._tables(bound, positions.device)
        positions = positions.clamp(min=0)
        return cos[positions], sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of ``x`` [..., D] (the HF Llama convention) by full-width tables
    from ``RotaryEmbedding``, broadcastable to x: ``x·cos + roll(x, D/2)·sin``."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
