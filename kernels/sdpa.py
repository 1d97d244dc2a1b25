"""The attention ops through ``F.scaled_dot_product_attention`` (SDPA) with a boolean key mask: the CPU path.

Same signatures and semantics as :func:`userllm.kernels.reference.latent_cross_attention` and
:func:`userllm.kernels.reference.cached_cross_attention` (the specification, fp32 einsum + mask); grouped
heads through ``enable_gqa=True`` (query head h reads KV head h // (Hq // Hkv), as the reference's
``repeat_interleave``). On CPU SDPA runs PyTorch's fused flash-attention kernel: no [B, H, T, N] score
tensor in fp32 materialized, softmax fused, and for grouped heads no repeated copy of K/V. Measured
against the reference on the model's shapes in benchmarks/test_kernels.py (see benchmarks/RESULTS.md);
:mod:`userllm.kernels.dispatch` uses it for CPU tensors where it wins.

A row with ``kv_lengths[b] == 0`` has no key to attend to: an all-False mask row would give NaN (0/0 in
the softmax), and its gradient NaN too. Such rows attend to every key instead (finite, discarded) and
their output is replaced by zeros with ``torch.where``, which also gives their queries, keys and values
exactly zero gradient, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .reference import check_attention_inputs, check_lengths

__all__ = ["latent_cross_attention", "cached_cross_attention"]


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                 scale: float | None) -> torch.Tensor:
    """q [B, T, Hq, D] over k, v [B, N, Hkv, D] (N >= 1) with keys at positions >= kv_lengths[b] masked.
    Returns [B, T, Hq, D] in q's dtype; rows with length 0 are zeros."""
    N = k.shape[1]
    lengths = kv_lengths.to(k.device)
    has_keys = lengths > 0
    visible = torch.where(has_keys, lengths, N)
    mask = (torch.arange(N, device=k.device)[None, :] < visible[:, None])[:, None, None, :]   # [B, 1, 1, N]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    out = out.transpose(1, 2)
    return torch.where(has_keys[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def latent_cross_attention(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """SDPA version of :func:`userllm.kernels.reference.latent_cross_attention`.

    latents: [M, H, D] shared by the batch (expanded as a view, never copied; its gradient is the batch
    sum) or [B, M, H, D]; k, v: [B, N, H, D]; kv_lengths: int [B] in [0, N]; one floating dtype.
    Returns [B, M, H, D] in latents' dtype.
    """
    check_attention_inputs(latents, k, v, "latent_cross_attention", shared_queries=True, grouped=False)
    B, N = k.shape[:2]
    check_lengths(kv_lengths, B, N, "latent_cross_attention")
    if N == 0:
        return reference.latent_cross_attention(latents, k, v, kv_lengths, scale)
    if latents.dim() == 3:
        latents = latents.unsqueeze(0).expand(B, -1, -1, -1)
    return _masked_sdpa(latents, k, v, kv_lengths, scale)


def cached_cross_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """SDPA version of :func:`userllm.kernels.reference.cached_cross_attention`.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, N, Hkv, D], Hq % Hkv == 0; kv_lengths: int [B] in [0, N];
    one floating dtype. Returns [B, T, Hq, D] in q's dtype.
    """
    check_attention_inputs(q, k_cache, v_cache, "cached_cross_attention", shared_queries=False, grouped=True)
    B, N = k_cache.shape[:2]
    check_lengths(kv_lengths, B, N, "cached_cross_attention")
    if N == 0:
        return reference.cached_cross_attention(q, k_cache, v_cache, kv_lengths, scale)
    return _masked_sdpa(q, k_cache, v_cache, kv_lengths, scale)
