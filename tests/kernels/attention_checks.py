"""What the two attention-kernel test modules share: the error measure and the forward + gradient
comparison of a fused op against the reference (run in fp32 on upcast copies of the same inputs)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with ||b|| floored at an rms of 0.1, the scale of these unit-variance inputs (an
    exactly-zero reference, e.g. dq when N = 1, must not turn rounding noise into a huge relative error)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(0.1 * b.numel() ** 0.5)).item()


def assert_matches_reference(fused: Callable, ref: Callable, inputs: Sequence[torch.Tensor],
                             lengths: torch.Tensor, names: Sequence[str]) -> None:
    """fused(*inputs, lengths) against ref(*fp32 copies, lengths): output, then the gradients of every input
    for one random output gradient; dtypes preserved, errors under ``TOL`` of the inputs' dtype."""
    dtype = inputs[0].dtype
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().float().requires_grad_() for t in inputs]
    out = fused(*leaves, lengths)
    want_out = ref(*ref_leaves, lengths)
    assert out.shape == want_out.shape and out.dtype == dtype
    assert rel_err(out, want_out) < TOL[dtype]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    got = torch.autograd.grad(out, leaves, grad.to(dtype))
    want = torch.autograd.grad(want_out, ref_leaves, grad)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert rel_err(a, b) < TOL[dtype], name
