"""Benchmarks of the fused ops against their peers, on the same inputs in one run.

Peers: the eager PyTorch reference, ``torch.compile`` of the reference, what a PyTorch user would write
(:mod:`peers`: ``F.embedding_bag`` per feature + ``cat``, and its ``torch.compile``; SDPA with a boolean
padding mask, ``enable_gqa`` for grouped-query) and flash-attn when importable. All candidates of a
benchmark are timed in interleaved rounds (``conftest.interleaved``). The fused op is the one
``userllm.kernels`` dispatches to automatically (Triton on CUDA, native C++ embedding_concat on CPU when
built), plus the forced native op on CUDA when that is built.

Shapes: on CUDA those of issue 4 (embedding_concat over 1M events; latent attention B=1024, M=16,
N in {50, 200}, H=8, D=64; decode T=1, B=256, Hq=32, Hkv=8, D=128, N in {16, 50, 200}), in bf16; on CPU
small fp32 shapes (2 cores). ``USERLLM_BENCH_SMALL=1`` forces the small shapes anywhere.
Results go to ``benchmark.extra_info`` (medians, speedups, GB/s, TFLOP/s); see benchmarks/RESULTS.md.

    pytest benchmarks/ --benchmark-only                       # measure
    pytest benchmarks/ --benchmark-disable                    # CI smoke: run once, check outputs
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from peers import TINY, embedding_bag_concat, embedding_bytes, key_mask
from userllm import kernels
from userllm.kernels import dispatch, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = DEVICE == "cuda" and os.environ.get("USERLLM_BENCH_SMALL", "0") in ("", "0") and not TINY
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture
def compiled(request):
    """torch.compile of a reference function, or None under --benchmark-disable (compiling is slow and the
    compiled path is covered by tests/kernels)."""
    def make(fn):
        if request.config.getoption("benchmark_disable", False) or TINY:
            return None
        return torch.compile(fn, fullgraph=True, dynamic=False)
    return make


def _add(candidates: dict, name: str, fn) -> None:
    if fn is not None:
        candidates[name] = fn


def _fused(op: str, device: str) -> str:
    return dispatch.resolve(op, torch.device(device))


# ------------------------------------------------------------------------------------- embedding_concat

def _embedding_inputs():
    g = torch.Generator().manual_seed(0)
    if FULL:
        B, L, specs = 1024, 1024, [(100_000, 64, None), (10, 8, None), (20, 32, 8)]
    else:
        B, L, specs = 16, 64, [(5_000, 64, None), (10, 8, None), (20, 32, 8)]
    ids, tables = [], []
    for V, D, K in specs:
        shape = (B, L) if K is None else (B, L, K)
        x = torch.randint(0, V, shape, generator=g)
        if K is not None:
            x[torch.rand(shape, generator=g) < 0.5] = -1  # "up to 8 genres per event"
        ids.append(x.to(DEVICE))
        tables.append(torch.randn(V, D, generator=g).to(DEVICE, DTYPE).requires_grad_())
    return ids, tables


@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
def test_embedding_concat(compare, compiled, direction):
    ids, tables = _embedding_inputs()
    fused = _fused("embedding_concat", DEVICE)
    grad = torch.randn(*ids[0].shape[:2], sum(t.shape[1] for t in tables), device=DEVICE, dtype=DTYPE)

    def runner(fn):
        if fn is None:
            return None
        if direction == "forward":
            return lambda: fn(ids, tables, "mean")
        return lambda: torch.autograd.grad(fn(ids, tables, "mean"), tables, grad)

    def backend(name):
        def call(i, t, p):
            with kernels.use_backend(name):
                return kernels.embedding_concat(i, t, p)
        return call

    candidates = {"eager": runner(reference.embedding_concat)}
    _add(candidates, "torch.compile", runner(compiled(reference.embedding_concat)))
    candidates["embedding_bag"] = runner(embedding_bag_concat)
    _add(candidates, "torch.compile(embedding_bag)", runner(compiled(embedding_bag_concat)))
    candidates[fused] = runner(backend(fused))
    if DEVICE == "cuda" and dispatch.native_available("cuda"):
        candidates["native"] = runner(backend("native"))
    compare(candidates, fused, bytes_moved=embedding_bytes(ids, tables) if direction == "forward" else None)


# ------------------------------------------------------------------------------------ attention peers

def _attention_flops(B, Hq, T, lengths, D, backward: bool) -> float:
    fwd = 4.0 * Hq * T * D * float(lengths.sum())
    return fwd * 3.5 if backward else fwd  # backward = 2.5x the forward's matmul work


# ------------------------------------------------------------------------------- latent_cross_attention

@pytest.mark.parametrize("n", [50, 200])
def test_latent_cross_attention_fwd_bwd(compare, compiled, flash_attn, n):
    B, M, H, D = (1024, 16, 8, 64) if FULL else (8, 16, 2, 32)
    g = torch.Generator().manual_seed(n)
    latents = torch.randn(M, H, D, generator=g).to(DEVICE, DTYPE).requires_grad_()
    k = torch.randn(B, n, H, D, generator=g).to(DEVICE, DTYPE).requires_grad_()
    v = torch.randn(B, n, H, D, generator=g).to(DEVICE, DTYPE).requires_grad_()
    lengths = torch.randint(1, n + 1, (B,), generator=g).to(DEVICE)
    grad = torch.randn(B, M, H, D, generator=g).to(DEVICE, DTYPE)
    mask = key_mask(lengths, n)
    fused = _fused("latent_cross_attention", DEVICE)

    def step(forward):
        return lambda: torch.autograd.grad(forward(), (latents, k, v), grad)

    def sdpa():
        q = latents.permute(1, 0, 2).unsqueeze(0).expand(B, -1, -1, -1)  # a view, as SDPA needs a batch dim
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    def fused_call():
        with kernels.use_backend(fused):
            return kernels.latent_cross_attention(latents, k, v, lengths)

    ref_c = compiled(reference.latent_cross_attention)
    candidates = {"eager": step(lambda: reference.latent_cross_attention(latents, k, v, lengths))}
    if ref_c is not None:
        candidates["torch.compile"] = step(lambda: ref_c(latents, k, v, lengths))
    candidates["sdpa_mask"] = step(sdpa)
    fa = flash_attn
    if fa is not None:
        cu_k = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        cu_q = torch.arange(0, (B + 1) * M, M, device=DEVICE, dtype=torch.int32)
        keep = key_mask(lengths, n).view(B, n)  # packs the valid keys, row after row

        def flash():
            q = latents.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * M, H, D)
            out = fa.flash_attn_varlen_func(q, k[keep], v[keep], cu_q, cu_k, M, n)
            return out.view(B, M, H, D)

        candidates["flash_attn_varlen"] = step(flash)
    candidates[fused] = step(fused_call)
    compare(candidates, fused, flops=_attention_flops(B, H, M, lengths, D, backward=True))


# ------------------------------------------------------------------------------- cached_cross_attention

@pytest.mark.parametrize("n", [16, 50, 200])
def test_cached_cross_attention_decode(compare, compiled, flash_attn, n):
    B, Hq, Hkv, D = (256, 32, 8, 128) if FULL else (8, 8, 2, 64)
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, 1, Hq, D, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(B, n, Hkv, D, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(B, n, Hkv, D, generator=g).to(DEVICE, DTYPE)
    lengths = torch.full((B,), n, device=DEVICE)  # user histories fill the cache at the benchmark's N
    mask = key_mask(lengths, n)
    fused = _fused("cached_cross_attention", DEVICE)
    ref_c = compiled(reference.cached_cross_attention)

    def sdpa():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    def fused_call():
        with kernels.use_backend(fused):
            return kernels.cached_cross_attention(q, k, v, lengths)

    candidates = {"eager": lambda: reference.cached_cross_attention(q, k, v, lengths)}
    if ref_c is not None:
        candidates["torch.compile"] = lambda: ref_c(q, k, v, lengths)
    candidates["sdpa_gqa_mask"] = sdpa
    fa = flash_attn
    if fa is not None:
        seqlens = lengths.to(torch.int32)
        candidates["flash_attn_kvcache"] = lambda: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    candidates[fused] = fused_call
    kv_bytes = 2.0 * float(lengths.sum()) * Hkv * D * k.element_size()
    compare(candidates, fused, bytes_moved=kv_bytes + 2 * q.numel() * q.element_size(),
            flops=_attention_flops(B, Hq, 1, lengths, D, backward=False), cuda_graph=DEVICE == "cuda")


# ------------------------------------------------------------------- attention on CPU at the model's shapes

# (B, T or M latents, Hq, Hkv, N, D): the default User-LLM (embedded LLM: 4 query / 2 KV heads of 32;
# batch 64, ~64 text positions, window 10 or AR50's 50 events) and its Perceiver (16 latents, 4 heads of 16)
MODEL_SHAPES = {
    "cross_attn_train_N10": (64, 64, 4, 2, 10, 32),
    "cross_attn_train_N50": (64, 64, 4, 2, 50, 32),
    "cross_attn_decode_N50": (64, 1, 4, 2, 50, 32),
    "perceiver_N50": (64, 16, 4, 4, 50, 16),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU path (SDPA vs the reference) at the model's shapes")
@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_attention_cpu_model_shapes(compare, compiled, benchmark, shape, direction):
    """The CPU attention path (``auto``: SDPA, userllm.kernels.sdpa) against the reference it replaced and
    torch.compile of that reference, at the model's shapes, fp32, one thread (the CLI's CPU default)."""
    latent = shape.startswith("perceiver")
    small = benchmark.disabled or TINY
    B, T, Hq, Hkv, N, D = (4, 5, 4, 4 if latent else 2, 7, 16) if small else MODEL_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*((T, Hq, D) if latent else (B, T, Hq, D)), generator=g).requires_grad_()
    k = torch.randn(B, N, Hkv, D, generator=g).requires_grad_()
    v = torch.randn(B, N, Hkv, D, generator=g).requires_grad_()
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[::8] = 0  # users without history: their rows must come out as zeros
    op = "latent_cross_attention" if latent else "cached_cross_attention"
    ref = getattr(reference, op)
    grad = torch.randn(B, T, Hq, D, generator=g)

    def run(fn):
        if direction == "forward":
            def forward():
                with torch.no_grad():
                    return fn(q, k, v, lengths)
            return forward
        return lambda: torch.autograd.grad(fn(q, k, v, lengths), (q, k, v), grad)

    def backend(name):
        def call(*args):
            with kernels.use_backend(name):
                return getattr(kernels, op)(*args)
        return call

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        candidates = {"eager": run(ref)}
        ref_c = compiled(ref)
        _add(candidates, "torch.compile", None if ref_c is None else run(ref_c))
        candidates["sdpa"] = run(backend("sdpa"))
        benchmark.extra_info.update(shape=shape, direction=direction, threads=1)
        compare(candidates, "sdpa", tol=1e-5)
    finally:
        torch.set_num_threads(before)
