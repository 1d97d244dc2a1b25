"""Triton ``latent_cross_attention``: Perceiver latents over a padded batch of events.

Same signature and semantics as :func:`userllm.kernels.reference.latent_cross_attention`. The math is
cached cross-attention with one query head per KV head, so the kernels, launchers, checks and
registration of :mod:`userllm.kernels.attention` do the work (shared with
:mod:`userllm.kernels.cached_cross_attention`) with GROUP = 1: one program per (batch b, head h, block of
up to 64 latents) keeps its query tile on chip and streams the b-th row's N keys in blocks, stopping at
``kv_lengths[b]``. Shared latents [M, H, D] are read with a batch stride of 0, never expanded in memory;
their gradient is the deterministic batch sum described there. This file registers the op
``userllm::triton_latent_cross_attention`` (+ ``_backward``) and checks its inputs.
"""

from __future__ import annotations

import torch

from ..reference import check_attention_inputs, softmax_scale
from .attention import INTERPRETED, register_attention_op

__all__ = ["latent_cross_attention", "INTERPRETED"]

_op = register_attention_op("latent_cross_attention")


def latent_cross_attention(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Triton version of :func:`userllm.kernels.reference.latent_cross_attention`.

    latents: [M, H, D] shared by the batch, or [B, M, H, D]; k, v: [B, N, H, D]; kv_lengths: int [B] in
    [0, N]; all floating tensors of one dtype. Returns [B, M, H, D] in latents' dtype; differentiable
    w.r.t. latents (the batch-summed gradient when shared), k and v.
    """
    check_attention_inputs(latents, k, v, "latent_cross_attention", shared_queries=True, grouped=False)
    return _op(latents, k, v, kv_lengths, softmax_scale(latents, scale))[0]
