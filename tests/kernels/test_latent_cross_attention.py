"""latent_cross_attention: Triton kernels (interpreted on CPU when there is no GPU) against the reference.

Shared latents [M, H, D] (batch-summed gradient) and per-row latents [B, M, H, D]; odd M, N and D,
lengths 0 and N, B = 1; forward and gradients in fp32 and bf16.
"""

import pytest
import torch

from attention_checks import assert_matches_reference
from userllm import kernels
from userllm.kernels import reference
from userllm.kernels.ops import latent_cross_attention as latent_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, M, H, N, D, shared, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(*(() if shared else (B,)), M, H, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype)
    lens = torch.randint(0, N + 1, (B,), generator=g)
    lens[0] = N
    if B > 2:
        lens[2] = 0
    return latents, k, v, lens.to(DEVICE)


SHAPES = [  # B, M, H, N, D
    (4, 16, 2, 50, 16),   # the Perceiver case (M = 16), N not a multiple of BLOCK_N, a length-0 row
    (3, 5, 3, 130, 40),   # M below one tile, three key blocks, D not a power of two
    (1, 70, 1, 9, 32),    # B = 1, M over one query block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_reference(shape, shared, dtype):
    inputs = make_inputs(*shape, shared=shared, dtype=dtype, seed=sum(shape))
    assert_matches_reference(latent_attention.latent_cross_attention, reference.latent_cross_attention,
                             inputs[:3], inputs[3], ("latents", "k", "v"))


def test_shared_latents_equal_expanded_and_zero_length_rows():
    latents, k, v, _ = make_inputs(3, 16, 2, 11, 16, shared=True, dtype=torch.float32)
    lens = torch.tensor([0, 11, 4], device=DEVICE)
    shared = latents.clone().requires_grad_()
    per_row = latents.expand(3, -1, -1, -1).clone().requires_grad_()
    out_s = latent_attention.latent_cross_attention(shared, k, v, lens)
    out_p = latent_attention.latent_cross_attention(per_row, k, v, lens)
    assert torch.allclose(out_s, out_p, atol=1e-6)
    assert torch.equal(out_s[0], torch.zeros_like(out_s[0]))
    (g_s,) = torch.autograd.grad(out_s.sum(), shared)
    (g_p,) = torch.autograd.grad(out_p.sum(), per_row)
    assert not g_p[0].any()  # a row with no keys has no gradient to its latents
    assert torch.allclose(g_s, g_p.sum(0), atol=1e-5)


def test_opcheck_and_public_dispatch():
    latents, k, v, lens = make_inputs(3, 16, 2, 20, 16, shared=True, dtype=torch.float32)
    args = (latents.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lens, 0.25)
    torch.library.opcheck(torch.ops.userllm.triton_latent_cross_attention.default, args)
    with kernels.use_backend("triton"):
        assert_matches_reference(kernels.latent_cross_attention, reference.latent_cross_attention,
                                 (latents.detach(), k.detach(), v.detach()), lens, "lkv", scale=0.25)


def test_invalid_inputs_raise():
    latents, k, v, lens = make_inputs(2, 4, 2, 8, 16, shared=True, dtype=torch.float32)
    with pytest.raises(ValueError):
        latent_attention.latent_cross_attention(latents, k, v, torch.tensor([9, 1], device=DEVICE))
    with pytest.raises(ValueError):
        latent_attention.latent_cross_attention(latents[:, :1], k, v, lens)  # head count mismatch
    with pytest.raises(ValueError):
        reference.latent_cross_attention(latents, k, v, torch.tensor([0, -2], device=DEVICE))


class _Perceiver(torch.nn.Module):
    def __init__(self, m=16, h=2, d=16):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(m, h, d))
        self.kv = torch.nn.Linear(h * d, 2 * h * d)
        self.h, self.d = h, d

    def forward(self, events, lengths):
        B, N, _ = events.shape
        k, v = self.kv(events).view(B, N, 2, self.h, self.d).unbind(2)
        return kernels.latent_cross_attention(self.latents, k, v, lengths).flatten(2)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = _Perceiver().to(DEVICE)
    events, lengths = torch.randn(3, 9, 32, device=DEVICE), torch.tensor([9, 0, 4], device=DEVICE)
    with kernels.use_backend(backend):
        eager = model(events, lengths)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), model.latents)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(events, lengths)
        (g_comp,) = torch.autograd.grad(out.square().sum(), model.latents)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)
