"""Inference: sampling (and, with the generation issue, caches for every mixer)."""
