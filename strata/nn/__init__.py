"""Primitives: norms, rotary embeddings, attention, the Mamba-2/SSD mixer, FFNs, the intra-layer hybrid."""
