"""cached_cross_attention: Triton kernels (interpreted on CPU when there is no GPU) against the reference.

Grouped-query shapes with odd sizes: T = 1 decode, groups of 1/3/4, N not a multiple of any block,
head dims that are not powers of two, lengths 0 and N, B = 1; forward and gradients in fp32 and bf16.
"""

import pytest
import torch

from attention_checks import assert_matches_reference
from userllm import kernels
from userllm.kernels import reference
from userllm.kernels.ops import cached_cross_attention as cached_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, Hq, Hkv, N, D, dtype, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(DEVICE, dtype)
    if lengths is None:
        lengths = torch.randint(0, N + 1, (B,), generator=g)
        lengths[0] = N
        if B > 1:
            lengths[1] = 0
    return q, k, v, torch.as_tensor(lengths, dtype=torch.int64).to(DEVICE)


SHAPES = [  # B, T, Hq, Hkv, N, D
    (3, 1, 8, 2, 37, 16),    # decode step, group 4, N not a multiple of BLOCK_N
    (2, 5, 6, 2, 70, 24),    # prefill, group 3 (rows 15 -> padded tile), two key blocks, D not a power of 2
    (1, 70, 2, 2, 1, 64),    # B = 1, N = 1, two query blocks (group 1: 64 rows per tile)
    (2, 3, 4, 1, 130, 32),   # multi-query (one KV head), three key blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_reference(shape, dtype):
    q, k, v, lens = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    assert_matches_reference(cached_attention.cached_cross_attention, reference.cached_cross_attention,
                             (q, k, v), lens, "qkv")


def test_lengths_zero_and_padding_keys():
    q, k, v, _ = make_inputs(3, 2, 4, 2, 21, 16, torch.float32)
    lens = torch.tensor([0, 21, 5], device=DEVICE)
    k.requires_grad_()
    v.requires_grad_()
    out = cached_attention.cached_cross_attention(q, k, v, lens)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    # keys at positions >= len never influence the output: exactly zero gradient
    assert not dk[0].any() and not dv[0].any()
    assert not dk[2, 5:].any() and not dv[2, 5:].any()
    assert dk[2, :5].abs().sum() > 0 and dv[1].abs().sum() > 0
    # padded key values are never read: garbage there changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[2, 5:] = float("nan")
    v2[2, 5:] = 1e30
    assert torch.equal(cached_attention.cached_cross_attention(q, k2, v2, lens), out.detach())


def test_custom_scale_and_public_dispatch():
    q, k, v, lens = make_inputs(2, 3, 4, 2, 9, 16, torch.float32)
    with kernels.use_backend("triton"):
        assert_matches_reference(kernels.cached_cross_attention, reference.cached_cross_attention,
                                 (q, k, v), lens, "qkv", scale=0.3)


def test_opcheck():
    q, k, v, lens = make_inputs(2, 2, 4, 2, 18, 16, torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lens, 0.25)
    torch.library.opcheck(torch.ops.userllm.triton_cached_cross_attention.default, args)


@pytest.mark.parametrize("bad", ["too_long", "negative", "group", "dtype"])
def test_invalid_inputs_raise(bad):
    q, k, v, lens = make_inputs(2, 1, 4, 2, 8, 16, torch.float32)
    if bad == "too_long":
        lens = torch.tensor([3, 9], device=DEVICE)
    elif bad == "negative":
        lens = torch.tensor([-1, 2], device=DEVICE)
    elif bad == "group":
        q = q[:, :, :3]
    else:
        k = k.double()
    error = TypeError if bad == "dtype" else ValueError
    with pytest.raises(error):
        cached_attention.cached_cross_attention(q, k, v, lens)
    if bad != "dtype":
        with pytest.raises(ValueError):
            reference.cached_cross_attention(q, k, v, lens)


def test_lengths_are_read_once_per_tensor_until_changed(monkeypatch):
    """The range check syncs the device; one lengths tensor serves every layer and decode step of a
    request, so its values are read once, and again only after an in-place change."""
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda x: reads.append(1) or real(x))
    q, k, v, lens = make_inputs(2, 1, 4, 2, 8, 16, torch.float32)
    for _ in range(3):
        reference.cached_cross_attention(q, k, v, lens)
        cached_attention.cached_cross_attention(q, k, v, lens)
    assert len(reads) == 1
    lens[0] = 9                                   # in place: the version counter moves, the check runs again
    with pytest.raises(ValueError, match=r"\[0, 8\], got \[.*9\]"):
        reference.cached_cross_attention(q, k, v, lens)
    assert len(reads) == 2
    with torch.inference_mode():                  # no version counter: read at every call
        frozen = lens.clone().clamp_(max=8)
        reference.cached_cross_attention(q, k, v, frozen)
        reference.cached_cross_attention(q, k, v, frozen)
    assert len(reads) == 4


class _UserCrossAttention(torch.nn.Module):
    def __init__(self, d=16, hq=4, hkv=2):
        super().__init__()
        self.hq, self.hkv, self.d = hq, hkv, d
        self.q = torch.nn.Linear(d * hq, d * hq)
        self.kv = torch.nn.Linear(d * hq, 2 * d * hkv)

    def forward(self, text, user, lengths):
        B, T, _ = text.shape
        q = self.q(text).view(B, T, self.hq, self.d)
        k, v = self.kv(user).view(B, user.shape[1], 2, self.hkv, self.d).unbind(2)
        return kernels.cached_cross_attention(q, k, v, lengths).flatten(2)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = _UserCrossAttention().to(DEVICE)
    text, user = torch.randn(2, 3, 64, device=DEVICE), torch.randn(2, 7, 64, device=DEVICE)
    lengths = torch.tensor([7, 2], device=DEVICE)
    with kernels.use_backend(backend):
        eager = model(text, user, lengths)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), model.q.weight)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(text, user, lengths)
        (g_comp,) = torch.autograd.grad(out.square().sum(), model.q.weight)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)
