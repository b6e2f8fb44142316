"""Functional building blocks: norms, rotary embeddings, attention, losses."""
