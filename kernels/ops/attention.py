"""Triton masked cross-attention shared by both attention ops: kernels, launchers, the graph-capture-safe
length check and the one ``torch.library`` registration helper (the shape/dtype checks, shared with the
SDPA path that must not import Triton, are :func:`userllm.kernels.reference.check_attention_inputs`).

The two public ops are thin files over this module, one registration call and one checked entry point
each: :mod:`userllm.kernels.cached_cross_attention` (text queries over a grouped-query K/V cache) and
:mod:`userllm.kernels.latent_cross_attention` (Perceiver latents = queries with one head per KV head and,
when shared by the batch, a batch stride of 0). Their specification is :mod:`userllm.kernels.reference`.

Design
------
Forward (``_attn_fwd_kernel``), one program per (batch b, KV head, block of BLOCK_T query positions):
  * The tile's rows are ``GROUP x BLOCK_T`` query rows: every query head of the KV head's group at every
    position of the block (row r -> position t0 + r // GROUP, head kvh * GROUP + r % GROUP). Each K/V
    block is therefore loaded once for the whole group, and even the T = 1 decode step gives
    ``tl.dot`` an M dimension of GROUP (padded to >= 16) instead of 1.
  * Keys are streamed in BLOCK_N blocks up to ``kv_lengths[b]`` only (the loop bound is the length, so
    padded keys are never read and no mask tensor exists); online softmax in fp32 with exp2.
  * A row with length 0 gets zeros. The per-row log-sum-exp (base 2) is saved for the backward pass.
Backward (``_attn_bwd_kernel``), one program per (batch, KV head, block of BLOCK_N keys):
  * loops over every query block, recomputes P from the saved LSE, accumulates dK and dV for its keys in
    registers (the sum over the group's query heads happens inside the tile) and stores them once;
  * dQ = dS K is accumulated with fp32 ``atomic_add``: at most ceil(len / BLOCK_N) programs (<= 4 at
    the N <= 200 of this project) touch one dQ element, so contention is negligible and it saves a second
    pass over K/V. Keys at positions >= len get exactly zero gradient.
  * Shared queries [T, H, D] (the latents): their gradient is a reduction over the batch. The kernel
    accumulates per-batch fp32 partials [B, T, H, D] (atomics only among the <= ceil(N / BLOCK_N)
    key-block programs of one (b, h)), and one ``sum(0)`` reduces them deterministically. Accumulating
    straight into [T, H, D] would make B programs (1024 in the paper's setting) collide on every element
    and make the result run-to-run nondeterministic, for a saving of only B*T*H*D*4 bytes.
fp32 inputs use ``input_precision="ieee"`` dots (no TF32) so fp32 results match the reference to ~1e-6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..env import interpreter_requested
from ..reference import check_lengths

#: True when these kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED = interpreter_requested()

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. UPCAST (interpreter only) works around the Triton interpreter's
    wrong bf16 ``tl.dot`` (it multiplies the raw bit patterns); compiled kernels never take that branch."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)



@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, LENS,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, N, HQ, D,
    GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    tblk = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)
    t = tblk * BLOCK_T + r // GROUP
    h = kvh * GROUP + r % GROUP
    row_ok = (r < GROUP * BLOCK_T) & (t < T)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    b64 = b.to(tl.int64)

    q_ptrs = Q + b64 * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # lengths are validated on the host; the clamp keeps memory safe when that check is skipped (graph capture)
    kv_len = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), N)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
    for n0 in range(0, kv_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        s = _mm(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # every block holds at least one valid key (n0 < kv_len), so m_new is finite: no NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b64 * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), 0.0)
    tl.store(LSE + (b64 * T + t) * HQ + h, lse, mask=row_ok)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, LENS, DQ, DK, DV,
    qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    T, N, HQ, D,
    GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    nblk = tl.program_id(2)
    b64 = b.to(tl.int64)
    kv_len = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), N)
    n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < kv_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + kvh * stride_kh + n[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + n[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    r = tl.arange(0, BLOCK_R)
    # a key block entirely beyond the length only writes its zero gradient
    num_t_blocks = tl.where(nblk * BLOCK_N < kv_len, tl.cdiv(T, BLOCK_T), 0)
    for tblk in range(0, num_t_blocks):
        t = tblk * BLOCK_T + r // GROUP
        h = kvh * GROUP + r % GROUP
        row_ok = (r < GROUP * BLOCK_T) & (t < T)
        row_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b64 * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=row_mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + t[:, None] * stride_dot + h[:, None] * stride_doh + d[None, :],
                     mask=row_mask, other=0.0)
        stat = (b64 * T + t) * HQ + h
        lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        s = _mm(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & n_ok[None, :], p, 0.0)
        dv += _mm(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST)
        dp = _mm(do, tl.trans(v), DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST)
        dq = _mm(ds.to(k.dtype), k, DOT_PRECISION, UPCAST) * sm_scale
        tl.atomic_add(DQ + ((b64 * T + t[:, None]) * HQ + h[:, None]) * D + d[None, :], dq, mask=row_mask)

    out_mask = (n < N)[:, None] & d_ok[None, :]
    tl.store(DK + b64 * stride_dkb + kvh * stride_dkh + n[:, None] * stride_dkn + d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b64 * stride_dvb + kvh * stride_dvh + n[:, None] * stride_dvn + d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------- launchers

def _tiles(backward: bool, dtype: torch.dtype, group: int, t: int, d: int, n: int) -> dict:
    """Tile sizes and warps of one launch.

    Rows = GROUP x BLOCK_T query rows (>= 16 for ``tl.dot``), keys in BLOCK_N >= 16 blocks. The sizes keep
    every kernel in registers: ``python -m userllm.kernels.compile_check`` (ptxas for sm_80 and sm_90)
    showed the earlier one-size choice (64 rows x 32 keys x D=128, 4 warps) spilling 48-376 bytes per
    thread in the bf16 backward and up to 13 KB in fp32, where ``ieee`` dots run on the FMA units and
    hold about twice the registers. Hence: fewer rows in the backward (it keeps K, V, dK and dV of its
    key block on chip), half the tile in fp32, and 8 warps for the backward at D = 128 (D >= 64 in fp32)
    and the fp32 forward at D >= 64. (8 warps elsewhere made sm_80 spill where 4 did not.)
    """
    fp32 = dtype == torch.float32
    rows = (32 if backward else 64) // (2 if fp32 else 1)
    block_t = max(1, min(triton.next_power_of_2(t), rows // group if group <= rows else 1))
    block_r = max(16, triton.next_power_of_2(group * block_t))
    block_d = max(16, triton.next_power_of_2(d))
    if fp32 and (backward or d > 32):
        block_n = 16
    else:
        block_n = 64 if block_d <= 64 else 32
    block_n = max(16, min(block_n, triton.next_power_of_2(n)))
    wide = block_d > (32 if fp32 else 64)
    num_warps = 8 if wide and (backward or fp32) else 4
    # software pipelining of the backward's q/dO loads costs the fp32 D = 128 tile 144-160 bytes of spill
    num_stages = 1 if fp32 and backward and block_d > 64 else 3
    return dict(GROUP=group, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=num_warps, num_stages=num_stages)


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would cost fp32 inputs ~1e-3 relative error; half-precision inputs ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _q_strides(q: torch.Tensor) -> tuple[int, int, int]:
    """(batch, position, head) strides of q [B, T, H, D] or of shared q [T, H, D] (batch stride 0)."""
    if q.dim() == 3:
        return 0, q.stride(0), q.stride(1)
    return q.stride(0), q.stride(1), q.stride(2)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    q: [B, T, Hq, D], or [T, Hq, D] shared by the batch (read with batch stride 0, never expanded).
    k, v: [B, N, Hkv, D] with Hq % Hkv == 0; kv_lengths int [B] (validated by the caller).
    Returns (out [B, T, Hq, D] in q's dtype, lse fp32 [B, T, Hq] in base 2).
    """
    q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
    B, N, Hkv, D = k.shape
    T, Hq = q.shape[-3], q.shape[-2]
    out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, Hq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    blocks = _tiles(False, q.dtype, Hq // Hkv, T, D, N)
    grid = (B, Hkv, triton.cdiv(T, blocks["BLOCK_T"]))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, kv_lengths.contiguous(), scale * LOG2E,
        *_q_strides(q), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), T, N, Hq, D,
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST=INTERPRETED and q.dtype == torch.bfloat16, **blocks,
    )
    return out, lse


def attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kv_lengths: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; shapes as in :func:`attention_forward`, grad like out.

    Returns (dq, dk, dv). For a shared q [T, Hq, D] dq is the sum over the batch of per-batch partials
    (accumulated in an fp32 [B, T, Hq, D] buffer, then one deterministic ``sum(0)``: the buffer is small
    next to K/V since T is the number of latents, and it keeps the atomics' contention per (b, head)).
    """
    q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
    grad = _inner_contiguous(grad)
    B, N, Hkv, D = k.shape
    T, Hq = q.shape[-3], q.shape[-2]
    dq_acc = torch.zeros((B, T, Hq, D), dtype=torch.float32, device=q.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if B * T * Hq * D and N:
        delta = (grad.float() * out.float()).sum(-1).contiguous()  # [B, T, Hq] = rowsum(dO * O)
        blocks = _tiles(True, q.dtype, Hq // Hkv, T, D, N)
        grid = (B, Hkv, triton.cdiv(N, blocks["BLOCK_N"]))
        _attn_bwd_kernel[grid](
            q, k, v, grad, lse, delta, kv_lengths.contiguous(), dq_acc, dk, dv,
            scale * LOG2E, scale,
            *_q_strides(q), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            grad.stride(0), grad.stride(1), grad.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2), T, N, Hq, D,
            DOT_PRECISION=_dot_precision(q.dtype), UPCAST=INTERPRETED and q.dtype == torch.bfloat16, **blocks,
        )
    else:
        dk.zero_()
        dv.zero_()
    dq = dq_acc.sum(0) if q.dim() == 3 else dq_acc
    return dq.to(q.dtype), dk, dv


def check_lengths_unless_capturing(kv_lengths: torch.Tensor, batch: int, n: int, op: str) -> None:
    """The reference's kv_lengths check (one host sync), skipped while a CUDA graph is being captured (a
    sync is illegal there); the kernels clamp lengths to [0, N] so a bad length can never read out of bounds."""
    if kv_lengths.is_cuda and torch.cuda.is_current_stream_capturing():
        if kv_lengths.dim() != 1 or kv_lengths.shape[0] != batch:
            raise ValueError(f"{op}: kv_lengths must be [B] = [{batch}], got {tuple(kv_lengths.shape)}")
        return
    check_lengths(kv_lengths, batch, n, op)


# ------------------------------------------------------------------------------- torch.library registration

def register_attention_op(op: str):
    """Register ``userllm::triton_{op}`` (q, k, v, kv_lengths, scale) -> (out, lse) and its backward
    ``userllm::triton_{op}_backward`` as ``torch.library`` custom ops with fake (meta) implementations and
    autograd, and return the forward op. Shapes as in :func:`attention_forward` (q may be shared, [T, Hq, D]).

    Custom ops make the kernels opaque nodes that ``torch.compile`` traces with ``fullgraph=True`` (the
    fake implementations give the output shapes) instead of tracing into the Triton launcher.
    """

    @torch.library.custom_op(f"userllm::triton_{op}", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # the value check runs here, outside any traced graph (it syncs the device)
        check_lengths_unless_capturing(kv_lengths, k.shape[0], k.shape[1], op)
        return attention_forward(q, k, v, kv_lengths.to(k.device), scale)

    @forward.register_fake
    def _(q, k, v, kv_lengths, scale):
        B, (T, Hq, D) = k.shape[0], q.shape[-3:]
        return q.new_empty((B, T, Hq, D)), q.new_empty((B, T, Hq), dtype=torch.float32)

    @torch.library.custom_op(f"userllm::triton_{op}_backward", mutates_args=())
    def backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_lengths: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attention_backward(grad, q, k, v, kv_lengths.to(k.device), out, lse, scale)

    @backward_op.register_fake
    def _(grad, q, k, v, kv_lengths, out, lse, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, kv_lengths, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, kv_lengths, out, lse)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, kv_lengths, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, kv_lengths, out, lse, ctx.scale)
        return dq, dk, dv, None, None

    forward.register_autograd(backward, setup_context=setup_context)
    return forward
