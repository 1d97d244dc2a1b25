"""Triton ``cached_cross_attention``: text queries [B, T, Hq, D] over a padded grouped-query K/V cache.

Same signature and semantics as :func:`userllm.kernels.reference.cached_cross_attention`. The kernels,
launchers, checks and registration live in :mod:`userllm.kernels.attention` (shared with
:mod:`userllm.kernels.latent_cross_attention`); this file registers the op
``userllm::triton_cached_cross_attention`` (+ ``_backward``) and checks its inputs.
"""

from __future__ import annotations

import torch

from ..reference import check_attention_inputs, softmax_scale
from .attention import INTERPRETED, register_attention_op

__all__ = ["cached_cross_attention", "INTERPRETED"]

_op = register_attention_op("cached_cross_attention")


def cached_cross_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Triton version of :func:`userllm.kernels.reference.cached_cross_attention`.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, N, Hkv, D], Hq % Hkv == 0 (query head h reads KV head
    h // (Hq // Hkv)); kv_lengths: int [B] in [0, N]; all floating tensors of one dtype.
    Returns [B, T, Hq, D] in q's dtype; differentiable w.r.t. q, k_cache and v_cache.
    """
    check_attention_inputs(q, k_cache, v_cache, "cached_cross_attention", shared_queries=False, grouped=True)
    return _op(q, k_cache, v_cache, kv_lengths, softmax_scale(q, scale))[0]
