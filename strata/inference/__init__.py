"""Inference: caches for every mixer and model, generation, sampling, and bits per byte of text
(the teacher-forced scoring that training's validation and the evaluations share)."""

from __future__ import annotations

from strata.inference.aunet_cache import AUNetCache
from strata.inference.cache import StackCache
from strata.models.aunet import AUNet


def model_cache(model, batch_size: int, capacity: int, starts=None) -> StackCache | AUNetCache:
    """The cache ``model(tokens, cache)`` fills and advances, for ``batch_size`` sequences
    left-padded by ``starts``, with room for ``capacity`` steps before it grows."""
    if isinstance(model, AUNet):
        return AUNetCache(model, batch_size, capacity, starts=starts)
    return StackCache(model.blocks, batch_size, capacity, starts=starts)
