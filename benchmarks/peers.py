"""What a PyTorch user would write instead of the fused ops: the peers the benchmarks compare against
(beside the project's own eager reference, a deliberately plain specification, and torch.compile of it),
the byte model of the embedding benchmarks, and the benchmarks' size switch.
"""

from __future__ import annotations

from typing import Sequence

import os

import torch
import torch.nn.functional as F

#: ``USERLLM_BENCH_TINY=1`` (benchmarks/gpu_check.sh --tiny, run by CI): toy shapes, no torch.compile peers,
#: a few interleaved rounds: every benchmark body runs and writes its JSON; the figures mean nothing.
TINY = os.environ.get("USERLLM_BENCH_TINY", "0") not in ("", "0")


def embedding_bag_concat(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str = "mean"
                         ) -> torch.Tensor:
    """``embedding_concat`` the way a PyTorch user writes it (issue 15's peer): per feature one
    ``F.embedding_bag(ids.clamp_min(0), table, mode="sum", per_sample_weights=valid / count)`` (the
    weights do the padding and the mean), reshaped to [B, L, D_f], then ``torch.cat``.

    ids: int [B, L] or [B, L, K] per feature (negative = padding); tables: [V_f, D_f]. Returns
    [B, L, sum D_f] in the tables' dtype; differentiable w.r.t. the tables.
    """
    parts = []
    for x, table in zip(ids, tables):
        x3 = x if x.dim() == 3 else x.unsqueeze(-1)
        B, L, K = x3.shape
        flat = x3.reshape(B * L, K)
        valid = flat >= 0
        weight = valid.to(table.dtype)
        if pooling == "mean":
            weight = weight / valid.sum(dim=1, keepdim=True).clamp_min(1).to(table.dtype)
        pooled = F.embedding_bag(flat.clamp_min(0), table, mode="sum", per_sample_weights=weight)
        parts.append(pooled.view(B, L, -1))
    return torch.cat(parts, dim=-1)


def key_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, 1, N], True = attend."""
    return (torch.arange(n, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def embedding_bytes(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor]) -> float:
    """Bytes one pass of ``embedding_concat``'s forward must move: the ids, the gathered table rows (one per
    valid id) and the output written once. (Rows of a small table re-read from cache count each time: the
    figure is the op's traffic as a gather, an upper bound on what reaches DRAM.)"""
    elt = tables[0].element_size()
    total = 0
    for x, t in zip(ids, tables):
        total += x.numel() * x.element_size() + int((x >= 0).sum()) * t.shape[1] * elt
    E = ids[0].shape[0] * ids[0].shape[1]
    return total + E * sum(t.shape[1] for t in tables) * elt
