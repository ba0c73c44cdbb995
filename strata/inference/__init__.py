"""Inference: caches for every mixer, generation, sampling."""
