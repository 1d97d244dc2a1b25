"""The SDPA path of the attention ops (userllm.kernels.sdpa, the CPU default) against the reference.

Grouped-query and shared-latent shapes with odd sizes, lengths 0 and N (rows with no key must give zeros
and exactly zero gradients, never NaN), B = 1, N = 0, a custom scale; forward and gradients in fp32 and
bf16; the public dispatch on CPU; torch.compile with fullgraph.
"""

import pytest
import torch

from attention_checks import assert_matches_reference
from userllm import kernels
from userllm.kernels import dispatch, reference, sdpa

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def lengths_for(B, N, g):
    lens = torch.randint(0, N + 1, (B,), generator=g)
    lens[0] = N
    if B > 1:
        lens[1] = 0
    return lens


CACHED = [  # B, T, Hq, Hkv, N, D
    (3, 1, 8, 2, 37, 16),    # decode step, group 4
    (4, 13, 6, 2, 11, 24),   # training-like T > N, group 3, D not a power of two
    (1, 5, 2, 2, 1, 32),     # B = 1, N = 1, no grouping
    (3, 7, 4, 1, 70, 8),     # multi-query
]


@DTYPES
@pytest.mark.parametrize("shape", CACHED, ids=lambda s: "x".join(map(str, s)))
def test_cached_matches_reference(shape, dtype):
    B, T, Hq, Hkv, N, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(dtype)
    assert_matches_reference(sdpa.cached_cross_attention, reference.cached_cross_attention, (q, k, v),
                             lengths_for(B, N, g), "qkv")


LATENT = [  # B, M, H, N, D
    (4, 16, 2, 50, 16),
    (3, 5, 3, 9, 40),
    (1, 7, 1, 130, 8),
]


@DTYPES
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("shape", LATENT, ids=lambda s: "x".join(map(str, s)))
def test_latent_matches_reference(shape, shared, dtype):
    B, M, H, N, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    latents = torch.randn(*(() if shared else (B,)), M, H, D, generator=g).to(dtype)
    k = torch.randn(B, N, H, D, generator=g).to(dtype)
    v = torch.randn(B, N, H, D, generator=g).to(dtype)
    assert_matches_reference(sdpa.latent_cross_attention, reference.latent_cross_attention, (latents, k, v),
                             lengths_for(B, N, g), ("latents", "k", "v"))


def test_rows_without_keys_are_zero_with_zero_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(3, 6, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(3, 6, 2, 16, generator=g, requires_grad=True)
    lens = torch.tensor([0, 6, 0])
    out = sdpa.cached_cross_attention(q, k, v, lens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    dq, dk, dv = torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v))
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
        assert not grad[0].any() and not grad[2].any()
    assert dq[1].abs().sum() > 0
    # every row empty, and a cache with no positions at all (N = 0)
    assert not sdpa.cached_cross_attention(q, k, v, torch.zeros(3, dtype=torch.long)).any()
    empty = torch.zeros(3, 0, 2, 16, requires_grad=True)
    out0 = sdpa.cached_cross_attention(q, empty, empty, torch.zeros(3, dtype=torch.long))
    assert out0.shape == q.shape and not out0.any()
    latents = torch.randn(5, 2, 16, requires_grad=True)
    assert not sdpa.latent_cross_attention(latents, empty, empty, torch.zeros(3, dtype=torch.long)).any()


def test_custom_scale_and_invalid_inputs():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g)
    lens = torch.tensor([9, 4])
    want = reference.cached_cross_attention(q, k, k, lens, scale=0.3)
    torch.testing.assert_close(sdpa.cached_cross_attention(q, k, k, lens, scale=0.3), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sdpa.cached_cross_attention(q, k, k, torch.tensor([10, 1]))
    with pytest.raises(ValueError, match="do not match"):
        sdpa.cached_cross_attention(q[:, :, :3], k, k, lens)
    with pytest.raises(TypeError, match="one floating dtype"):
        sdpa.cached_cross_attention(q, k.double(), k, lens)
    with pytest.raises(ValueError, match="do not match"):
        sdpa.latent_cross_attention(q[0], k, k, lens)   # 4 latent heads over 2 KV heads


def test_cpu_dispatch_uses_sdpa(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls = []
    real = sdpa.cached_cross_attention
    monkeypatch.setattr(sdpa, "cached_cross_attention", lambda *a: calls.append(1) or real(*a))
    N = dispatch.SDPA_MIN_KEYS
    q, kv, lens = torch.randn(2, 1, 4, 16), torch.randn(2, N, 2, 16), torch.tensor([N, 0])
    with kernels.use_backend("auto"):
        out = kernels.cached_cross_attention(q, kv, kv, lens)
    with kernels.use_backend("reference"):
        want = kernels.cached_cross_attention(q, kv, kv, lens)
    assert calls == [1]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


class _Block(torch.nn.Module):
    """Perceiver latents over events, then text queries over the latents: both ops in one graph."""

    def __init__(self, d=16, h=2):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(5, h, d))
        self.kv = torch.nn.Linear(h * d, 2 * h * d)
        self.q = torch.nn.Linear(h * d, 2 * h * d)
        self.h, self.d = h, d

    def forward(self, events, text, lengths):
        B, N, _ = events.shape
        k, v = self.kv(events).view(B, N, 2, self.h, self.d).unbind(2)
        lat = kernels.latent_cross_attention(self.latents, k, v, lengths)               # [B, 5, h, d]
        q = self.q(text).view(B, text.shape[1], 2 * self.h, self.d)
        return kernels.cached_cross_attention(q, lat, lat, (lengths > 0).long() * 5).flatten(2)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = _Block()
    events, text, lengths = torch.randn(3, 9, 32), torch.randn(3, 4, 32), torch.tensor([9, 0, 4])
    with kernels.use_backend("sdpa"):
        eager = model(events, text, lengths)
        g_eager = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(events, text, lengths)
        g_comp = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
