"""Fused ops of userllm, imported as ``userllm.kernels``.

Public API (signatures fixed; see :mod:`userllm.kernels.reference` for the specification):
``embedding_concat``, ``latent_cross_attention``, ``cached_cross_attention``.
"""

from .reference import cached_cross_attention, embedding_concat, latent_cross_attention

__all__ = ["embedding_concat", "latent_cross_attention", "cached_cross_attention"]
