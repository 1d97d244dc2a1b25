"""PyTorch reference implementations: the specification of every fused op.

Each function here has exactly the signature of its public op in :mod:`userllm.kernels`; the Triton
and native implementations are tested against these on random inputs. They favour clarity over
speed, and compute attention in float32 whatever the input dtype (outputs are cast back).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

POOLINGS = ("mean", "sum")


def check_embedding_inputs(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str,
                           values: bool = True) -> None:
    """Validate ``embedding_concat`` arguments; out-of-range ids raise ``IndexError`` naming the feature.

    Shared by every backend so that all of them reject the same inputs with the same message (and a GPU
    never hits a device-side assert on a bad id). ``values=False`` skips the id range test (one max per
    feature and a device sync) for a kernel that tests every id while reading it and raises the same
    error, as the native CPU kernel does: on the benchmark's shape the test is ~0.3 ms of a ~3 ms op.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"embedding_concat: pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(ids) != len(tables):
        raise ValueError(f"embedding_concat: got {len(ids)} id tensors but {len(tables)} tables")
    if len(ids) == 0:
        raise ValueError("embedding_concat: needs at least one feature")
    lead = ids[0].shape[:2]
    for f, (x, t) in enumerate(zip(ids, tables)):
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"embedding_concat: ids[{f}] must be int32 or int64, got {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[:2] != lead:
            raise ValueError(f"embedding_concat: ids[{f}] must be [B, L] or [B, L, K] with [B, L] = "
                             f"{tuple(lead)}, got {tuple(x.shape)}")
        if t.dim() != 2:
            raise ValueError(f"embedding_concat: tables[{f}] must be [V, D], got {tuple(t.shape)}")
        if t.dtype != tables[0].dtype:
            raise TypeError(f"embedding_concat: tables[{f}] is {t.dtype} but tables[0] is {tables[0].dtype}")
    if not values or torch.compiler.is_compiling():
        return  # value checks need the data; a compiled graph cannot branch on it (F.embedding still checks)
    # one device sync for all features rather than one per feature
    present = [f for f, x in enumerate(ids) if x.numel()]
    if present:
        maxes = torch.stack([ids[f].max().to(device=ids[present[0]].device, dtype=torch.int64)
                             for f in present]).tolist()
        for f, top in zip(present, maxes):
            if top >= tables[f].shape[0]:
                raise IndexError(f"embedding_concat: feature {f} has id {top} but its table has only "
                                 f"{tables[f].shape[0]} rows")


def embedding_concat(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """Look up every feature's embedding and concatenate them per event.

    ids:    sequence of int32/int64 tensors, one per feature, [B, L] or [B, L, K]; negative = padding.
    tables: sequence of float tensors [V_i, D_i] of one dtype.
    pooling: "mean" (over the valid ids of an event) or "sum", for [B, L, K] features.
    Returns [B, L, sum(D_i)] in the tables' dtype; an event with no valid id of a feature gets zeros there.
    """
    check_embedding_inputs(ids, tables, pooling)
    parts = []
    for x, table in zip(ids, tables):
        x3 = x if x.dim() == 3 else x.unsqueeze(-1)
        valid = x3 >= 0
        rows = F.embedding(x3.clamp_min(0).long(), table)                   # [B, L, K, D]
        pooled = (rows * valid.unsqueeze(-1).to(rows.dtype)).sum(dim=2)     # [B, L, D]
        if pooling == "mean":
            count = valid.sum(dim=-1, keepdim=True).clamp_min(1)
            pooled = pooled / count.to(pooled.dtype)
        parts.append(pooled)
    return torch.cat(parts, dim=-1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, T, H, D] over k, v [B, N, H, D] where keys at positions >= kv_lengths[b] are masked.

    Rows with ``kv_lengths[b] == 0`` return zeros. Computed in float32, returned in q's dtype.
    """
    B, T, H, D = q.shape
    N = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bnhd->bhtn", q.float(), k.float()) * scale
    key_valid = torch.arange(N, device=k.device)[None, :] < kv_lengths.to(k.device)[:, None]  # [B, N]
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(key_valid.any(dim=1)[:, None, None, None], probs, torch.zeros_like(probs))
    out = torch.einsum("bhtn,bnhd->bthd", probs, v.float())
    return out.to(q.dtype)


# kv_lengths tensor -> (its version counter, min, max) when last read: the range check costs a device sync,
# and one lengths tensor serves every cross-attention layer at every decode step of a request, so it is
# read once per tensor (and again only after an in-place change bumps its version).
_length_ranges: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_lengths(kv_lengths: torch.Tensor, batch: int, n: int, op: str) -> None:
    """Validate kv_lengths: int [batch] with values in [0, n] (value check skipped while compiling).

    The values are read (one device sync) once per tensor and remembered until it is modified in place
    (not for inference-mode tensors, which keep no version counter).
    """
    if kv_lengths.dim() != 1 or kv_lengths.shape[0] != batch:
        raise ValueError(f"{op}: kv_lengths must be [B] = [{batch}], got {tuple(kv_lengths.shape)}")
    if kv_lengths.dtype.is_floating_point or kv_lengths.dtype == torch.bool:
        raise TypeError(f"{op}: kv_lengths must be an integer tensor, got {kv_lengths.dtype}")
    if kv_lengths.numel() and not torch.compiler.is_compiling():
        # inference-mode tensors keep no version counter, so an in-place change could not be seen: no memo
        version = None if kv_lengths.is_inference() else kv_lengths._version
        seen = _length_ranges.get(kv_lengths) if version is not None else None
        if seen is not None and seen[0] == version:
            lo, hi = seen[1:]
        else:
            lo, hi = torch.stack(torch.aminmax(kv_lengths)).tolist()  # one device sync
            if version is not None:
                _length_ranges[kv_lengths] = (version, lo, hi)
        if lo < 0 or hi > n:
            raise ValueError(f"{op}: kv_lengths must lie in [0, {n}], got [{lo}, {hi}]")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str, *,
                           shared_queries: bool, grouped: bool) -> None:
    """Shape/dtype checks that need no device sync (safe while torch.compile traces the caller).

    q: [B, T, Hq, D], or also [T, Hq, D] when ``shared_queries``; k, v: [B, N, Hkv, D] with Hq % Hkv == 0
    when ``grouped``, else Hq == Hkv.
    """
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{op}: k and v must both be [B, N, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dim() != 4 and not (q.dim() == 3 and shared_queries):
        raise ValueError(f"{op}: bad query shape {tuple(q.shape)}")
    heads_ok = q.shape[-2] % k.shape[2] == 0 if grouped else q.shape[-2] == k.shape[2]
    if q.shape[-1] != k.shape[-1] or not heads_ok or (q.dim() == 4 and q.shape[0] != k.shape[0]):
        raise ValueError(f"{op}: queries {tuple(q.shape)} do not match keys {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"{op}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device")


def softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: ``scale``, or 1/sqrt(D) for q [..., D]."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def latent_cross_attention(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Perceiver cross-attention of learned latents over a padded batch of events.

    latents: [M, H, D] shared by the batch, or [B, M, H, D].
    k, v:    [B, N, H, D]; kv_lengths: int [B] in [0, N]. Returns [B, M, H, D] in latents' dtype.
    """
    B, N, H, D = k.shape
    check_lengths(kv_lengths, B, N, "latent_cross_attention")
    if latents.dim() == 3:
        latents = latents.unsqueeze(0).expand(B, -1, -1, -1)
    if latents.shape[0] != B or latents.shape[2:] != (H, D):
        raise ValueError(f"latent_cross_attention: latents {tuple(latents.shape)} do not match k {tuple(k.shape)}")
    return masked_attention(latents, k, v, kv_lengths, scale)


def cached_cross_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Text queries attending to cached user K/V, with grouped-query heads.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, N, Hkv, D], Hq % Hkv == 0 (query head h reads KV head
    h // (Hq // Hkv), as in Hugging Face's ``repeat_kv``); kv_lengths: int [B] in [0, N].
    Returns [B, T, Hq, D] in q's dtype.
    """
    B, T, Hq, D = q.shape
    N, Hkv = k_cache.shape[1], k_cache.shape[2]
    check_lengths(kv_lengths, B, N, "cached_cross_attention")
    if Hq % Hkv != 0:
        raise ValueError(f"cached_cross_attention: Hq={Hq} is not a multiple of Hkv={Hkv}")
    group = Hq // Hkv
    k = k_cache.repeat_interleave(group, dim=2)
    v = v_cache.repeat_interleave(group, dim=2)
    return masked_attention(q, k, v, kv_lengths, scale)
