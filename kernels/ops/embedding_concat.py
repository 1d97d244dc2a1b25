"""Triton multi-feature embedding lookup + pooling + concatenation, with autograd and torch.library registration.

Public entry point: :func:`embedding_concat` (same signature and semantics as
:func:`userllm.kernels.reference.embedding_concat`).

Forward (``_emb_fwd_kernel``), one launch per feature, one program per (block of BLOCK_E events,
block of BLOCK_D columns): gathers the K ids of each event, sums the valid rows in fp32, divides by the
count of valid ids (mean pooling) and stores straight into the feature's column slice of the
concatenated output [B, L, sum(D_i)]: no per-feature intermediate and no ``torch.cat``.

Backward (``_emb_bwd_kernel``): grad_table[v] = sum over the (event e, slot k) with ids[e, k] = v of
w[e, k] * grad_out[e, feature columns], with w = 1 / count(e) (mean) or 1 (sum). Naive atomics would
serialize on tiny tables (every event hits one of the ~10 rows of a rating table), so:
  1. sort the flattened ids (``torch.sort``; padding ids < 0 sort first and are skipped),
  2. one program per chunk of CHUNK sorted positions x BLOCK_D columns gathers its weighted gradient rows
     and does a *segmented* prefix sum along the chunk (``tl.associative_scan``; a run of equal ids is a
     segment),
  3. only the last position of each run adds its run total to the fp32 gradient, with ``atomic_add``.
A row therefore receives one atomic add per chunk it appears in (at most ceil(count / CHUNK) + 1) instead
of one per occurrence: the rating row hit by 1M events gets ~8k adds instead of 1M, and an item row hit a
few times gets one. Runs strictly inside a chunk have a single writer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..env import interpreter_requested
from ..reference import check_embedding_inputs

#: True when these kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED = interpreter_requested()


# The column layout (D, the row strides, the feature's column offset) is compile-time: a model has a fixed
# set of features, and only known values let the compiler prove 16-byte alignment. With them as runtime
# ints (104-wide output rows, offsets 64 and 72: not multiples of 16, so no divisibility hint) ptxas for
# sm_90 emitted 2-byte scalar stores (STG.E.U16) for the output and 2-byte loads of the gradient rows;
# as constants, 16-byte vector accesses (cuobjdump -sass, see userllm.kernels.compile_check).
@triton.jit
def _emb_fwd_kernel(
    IDS, TABLE, OUT,
    E, K, D: tl.constexpr, stride_table: tl.constexpr, stride_out: tl.constexpr, col_offset: tl.constexpr,
    MEAN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_ok = e < E
    d_ok = d < D
    e64 = e.to(tl.int64)
    acc = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_E], tl.float32)
    for k in range(0, K):
        idx = tl.load(IDS + e64 * K + k, mask=e_ok, other=-1).to(tl.int64)
        ok = idx >= 0
        rows = tl.load(TABLE + idx[:, None] * stride_table + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += rows.to(tl.float32)
        count += ok.to(tl.float32)
    if MEAN:
        acc = acc / tl.maximum(count, 1.0)[:, None]
    out_ptrs = OUT + e64[:, None] * stride_out + col_offset + d[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=e_ok[:, None] & d_ok[None, :])


@triton.jit
def _segment_combine(start_a, sum_a, start_b, sum_b):
    # (flag, value) pairs: a segment start in b discards what came before it
    return start_a | start_b, tl.where(start_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _emb_bwd_kernel(
    SORTED_IDS, ORDER, WEIGHT, GRAD, DTABLE,
    EK, K, D: tl.constexpr, stride_grad: tl.constexpr, col_offset: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_ok = i < EK
    d_ok = d < D
    sid = tl.load(SORTED_IDS + i, mask=i_ok, other=-1).to(tl.int64)
    # neighbours decide run boundaries; a chunk's first/last position always starts/ends a run locally
    lane = tl.arange(0, CHUNK)
    prev = tl.load(SORTED_IDS + i - 1, mask=i_ok & (lane > 0), other=-2).to(tl.int64)
    nxt = tl.load(SORTED_IDS + i + 1, mask=(i + 1 < EK) & (lane < CHUNK - 1), other=-2).to(tl.int64)
    valid = i_ok & (sid >= 0)
    pos = tl.load(ORDER + i, mask=valid, other=0).to(tl.int64)
    w = tl.load(WEIGHT + pos, mask=valid, other=0.0)
    event = pos // K
    g = tl.load(GRAD + event[:, None] * stride_grad + col_offset + d[None, :],
                mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * w[:, None]
    start = tl.broadcast_to((sid != prev).to(tl.int32)[:, None], (CHUNK, BLOCK_D))
    _, run_sum = tl.associative_scan((start, g), 0, _segment_combine)
    run_end = valid & (sid != nxt)
    tl.atomic_add(DTABLE + sid[:, None] * D + d[None, :], run_sum, mask=run_end[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def _flat_ids(x: torch.Tensor) -> torch.Tensor:
    """[B, L] or [B, L, K] ids -> contiguous [E, K]."""
    x3 = x if x.dim() == 3 else x.unsqueeze(-1)
    return x3.reshape(-1, x3.shape[-1]).contiguous()


def _fwd_blocks(d: int) -> tuple[int, int]:
    block_d = min(128, triton.next_power_of_2(d))
    block_e = max(16, min(256, 4096 // block_d))  # ~4k elements per tile
    return block_e, block_d


def _bwd_blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, CHUNK, num_warps) of the backward. The interpreter runs a custom-combine scan element by
    element in Python, so under it the tiles shrink to 16 x 16 (which also makes tests cross chunk
    boundaries). Compiled, a 4k-element tile takes 8 warps: with 4, ptxas for sm_80 needs all 255
    registers and spills (``python -m userllm.kernels.compile_check``); with 8 it uses 155 and none."""
    if INTERPRETED:
        return min(16, triton.next_power_of_2(d)), 16, 4
    block_d = min(64, triton.next_power_of_2(d))
    chunk = max(32, min(128, 4096 // block_d))  # 256 x 8 (a rating table) spilled on sm_80 in fp32
    return block_d, chunk, 8 if chunk * block_d >= 4096 else 4


def embedding_concat_forward(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str) -> torch.Tensor:
    """Launch one forward kernel per feature into one [B, L, sum(D_i)] output (inputs already validated)."""
    B, L = ids[0].shape[:2]
    total = sum(t.shape[1] for t in tables)
    out = torch.empty((B, L, total), dtype=tables[0].dtype, device=tables[0].device)
    E = B * L
    offset = 0
    for x, table in zip(ids, tables):
        V, D = table.shape
        if table.stride(1) != 1:
            table = table.contiguous()
        flat = _flat_ids(x).to(table.device)
        if E and D:
            block_e, block_d = _fwd_blocks(D)
            grid = (triton.cdiv(E, block_e), triton.cdiv(D, block_d))
            _emb_fwd_kernel[grid](flat, table, out, E, flat.shape[1], D, table.stride(0), total, offset,
                                  MEAN=pooling == "mean", BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4)
        offset += D
    return out


def embedding_concat_backward(grad: torch.Tensor, ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
                              pooling: str) -> list[torch.Tensor]:
    """Gradients [V_i, D_i] of every table (in the tables' dtype) for grad_out [B, L, sum(D_i)]."""
    grad = grad.contiguous()
    total = grad.shape[-1]
    grads = []
    offset = 0
    for x, table in zip(ids, tables):
        V, D = table.shape
        flat = _flat_ids(x).to(grad.device)
        E, K = flat.shape
        valid = flat >= 0
        weight = valid.to(torch.float32)
        if pooling == "mean":
            weight = weight / valid.sum(dim=1, keepdim=True).clamp_min(1).to(torch.float32)
        keys = flat.reshape(-1).clamp_min(-1)  # every padding id -> -1 (no int32 wrap-around below)
        if V < 2**31 and keys.dtype != torch.int32:
            keys = keys.to(torch.int32)  # a 32-bit radix sort does half the passes
        sorted_ids, order = torch.sort(keys)
        dtable = torch.zeros((V, D), dtype=torch.float32, device=grad.device)
        if keys.numel() and D:
            block_d, chunk, num_warps = _bwd_blocks(D)
            grid = (triton.cdiv(keys.numel(), chunk), triton.cdiv(D, block_d))
            _emb_bwd_kernel[grid](sorted_ids, order, weight.reshape(-1), grad, dtable, keys.numel(), K, D,
                                  total, offset, CHUNK=chunk, BLOCK_D=block_d, num_warps=num_warps)
        grads.append(dtable.to(table.dtype))
        offset += D
    return grads


# ------------------------------------------------------------------------------- torch.library registration

@torch.library.custom_op("userllm::triton_embedding_concat", mutates_args=())
def _embedding_concat_op(ids: list[torch.Tensor], tables: list[torch.Tensor], pooling: str) -> torch.Tensor:
    # the value check (ids < V_i) runs here, outside any traced graph, before a launch: a bad id raises
    # IndexError naming the feature instead of a device-side assert
    check_embedding_inputs(ids, tables, pooling)
    return embedding_concat_forward(ids, tables, pooling)


@_embedding_concat_op.register_fake
def _(ids, tables, pooling):
    B, L = ids[0].shape[:2]
    return tables[0].new_empty((B, L, sum(t.shape[1] for t in tables)))


@torch.library.custom_op("userllm::triton_embedding_concat_backward", mutates_args=())
def _embedding_concat_backward_op(grad: torch.Tensor, ids: list[torch.Tensor], tables: list[torch.Tensor],
                                  pooling: str) -> list[torch.Tensor]:
    return embedding_concat_backward(grad, ids, tables, pooling)


@_embedding_concat_backward_op.register_fake
def _(grad, ids, tables, pooling):
    return [torch.empty_like(t) for t in tables]


def _setup_context(ctx, inputs, output):
    ids, tables, pooling = inputs
    ctx.save_for_backward(*ids, *tables)  # tables only for their shapes/dtypes: no copy, they are parameters
    ctx.num_features = len(ids)
    ctx.pooling = pooling


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    ids, tables = list(saved[:ctx.num_features]), list(saved[ctx.num_features:])
    grads = torch.ops.userllm.triton_embedding_concat_backward(grad_out, ids, tables, ctx.pooling)
    return [None] * ctx.num_features, list(grads), None


_embedding_concat_op.register_autograd(_backward, setup_context=_setup_context)


def embedding_concat(ids: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """Triton version of :func:`userllm.kernels.reference.embedding_concat`.

    ids: int32/int64 [B, L] or [B, L, K] per feature (negative = padding); tables: [V_i, D_i] of one
    float dtype. Returns [B, L, sum(D_i)]; differentiable w.r.t. tables; an id >= V_i raises IndexError.
    """
    return torch.ops.userllm.triton_embedding_concat(list(ids), list(tables), pooling)
