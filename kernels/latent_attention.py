"""Triton Perceiver cross-attention (learned latents over a padded batch of events).

Public entry point: :func:`latent_cross_attention` (same signature and semantics as
:func:`userllm.kernels.reference.latent_cross_attention`).

The math is cached cross-attention with one query head per KV head, so the kernels of
:mod:`userllm.kernels.cached_attention` do the work with GROUP = 1: one program per (batch b, head h,
block of up to 64 latents) keeps its query tile on chip and streams the b-th row's N keys (N <= a few
hundred) in blocks with an online softmax, stopping at ``kv_lengths[b]``.

Shared latents [M, H, D] are read with a batch stride of 0: they are never expanded per batch row in
memory. Their gradient is a reduction over the batch: the backward kernel accumulates per-batch fp32
partials [B, M, H, D] (fp32 atomics only among the <= ceil(N / BLOCK_N) key-block programs of one
(b, h), so contention stays tiny), and one ``sum(0)`` reduces them deterministically. Accumulating
straight into [M, H, D] with atomics would make B programs (1024 in the paper's setting) collide on
every element and make the result run-to-run nondeterministic, for a saving of only B*M*H*D*4 bytes.
"""

from __future__ import annotations

import torch

from .cached_attention import (INTERPRETED, attention_backward, attention_forward, check_attention_inputs,
                               check_lengths_unless_capturing)

__all__ = ["latent_cross_attention", "INTERPRETED"]


@torch.library.custom_op("userllm::triton_latent_cross_attention", mutates_args=())
def _latent_op(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_lengths_unless_capturing(kv_lengths, k.shape[0], k.shape[1], "latent_cross_attention")
    return attention_forward(latents, k, v, kv_lengths.to(k.device), scale)


@_latent_op.register_fake
def _(latents, k, v, kv_lengths, scale):
    B, _, H, D = k.shape
    M = latents.shape[-3]
    return latents.new_empty((B, M, H, D)), latents.new_empty((B, M, H), dtype=torch.float32)


@torch.library.custom_op("userllm::triton_latent_attention_backward", mutates_args=())
def _latent_backward_op(grad: torch.Tensor, latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_lengths: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad, latents, k, v, kv_lengths.to(k.device), out, lse, scale)


@_latent_backward_op.register_fake
def _(grad, latents, k, v, kv_lengths, out, lse, scale):
    return torch.empty_like(latents), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    latents, k, v, kv_lengths, scale = inputs
    out, lse = output
    ctx.save_for_backward(latents, k, v, kv_lengths, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    latents, k, v, kv_lengths, out, lse = ctx.saved_tensors
    dl, dk, dv = torch.ops.userllm.triton_latent_attention_backward(grad_out, latents, k, v, kv_lengths, out, lse,
                                                                    ctx.scale)
    return dl, dk, dv, None, None


_latent_op.register_autograd(_backward, setup_context=_setup_context)


def latent_cross_attention(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Triton version of :func:`userllm.kernels.reference.latent_cross_attention`.

    latents: [M, H, D] shared by the batch, or [B, M, H, D]; k, v: [B, N, H, D];
    kv_lengths: int [B] in [0, N]. Returns [B, M, H, D] in latents' dtype; differentiable w.r.t. latents
    (the batch-summed gradient when shared), k and v.
    """
    check_attention_inputs(latents, k, v, "latent_cross_attention")
    if latents.shape[-2] != k.shape[2]:
        raise ValueError(f"latent_cross_attention: latents {tuple(latents.shape)} do not match k {tuple(k.shape)}")
    scale = latents.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.userllm.triton_latent_cross_attention(latents, k, v, kv_lengths, scale)[0]
