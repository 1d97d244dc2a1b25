"""flash-attn's accuracy rule for fused kernels, shared by every kernel test.

A fixed tolerance says nothing about whether a kernel is as accurate as it can be at its precision, and a floored
relative one breaks on exactly-zero references (dK when N = 1: the reference is exactly 0, the fused kernel's online
softmax leaves rounding noise; a new numpy/triton moved that noise over a 1e-5 floor and turned CI red). So, as in
flash-attn's tests, three answers are computed on the same (already rounded) inputs:

- ``fp64``: the PyTorch reference in float64, taken as the exact answer;
- ``same``: the PyTorch reference in the inputs' own precision, what a user gets without the fused op;
- ``fused``: the kernel under test.

and the fused answer must be no further from ``fp64`` than ``MULTIPLE`` times the same-precision reference is, plus
an absolute term of ``ULPS`` units in the last place of the comparison's largest reference value (so an exact
reference, whose same-precision error is 0, still admits the rounding of a different summation order).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

MULTIPLE = 2.0   # flash-attn uses 2 for the forward and the gradients
ULPS = 8         # absolute slack in units of eps(dtype) * the largest |reference| of the comparison


def max_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    return (a.detach().double().cpu() - exact.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def assert_within_reference_error(names: Sequence[str], fused: Sequence[torch.Tensor], same: Sequence[torch.Tensor],
                                  exact: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
    """Each ``fused[i]`` is within ``MULTIPLE`` x the error of ``same[i]`` against ``exact[i]`` (+ the ULPS term).

    The absolute term uses the largest |exact| over the whole group (e.g. all gradients of one call), because a
    tensor that is exactly zero in the reference (dQ, dK with a single key) carries noise at the scale of its
    sibling tensors, not at its own.
    """
    scale = max([max(e.detach().abs().max().item(), 0.0) for e in exact if e.numel()] + [1.0])
    atol = ULPS * torch.finfo(dtype).eps * scale
    for name, f, s, e in zip(names, fused, same, exact, strict=True):
        assert f.shape == e.shape, f"{name}: shape {tuple(f.shape)} != {tuple(e.shape)}"
        err, base = max_error(f, e), max_error(s, e)
        bound = MULTIPLE * base + atol
        assert err <= bound, (f"{name}: fused error {err:.3g} > {MULTIPLE} x same-precision reference error "
                              f"{base:.3g} + {atol:.3g}")


def check_op(fused: Callable[[list[torch.Tensor]], torch.Tensor], ref: Callable[[list[torch.Tensor]], torch.Tensor],
             inputs: Sequence[torch.Tensor], names: str | Sequence[str] = "", *, grad_seed: int = 1,
             grads: bool = True) -> torch.Tensor:
    """Run ``fused(inputs)`` and ``ref`` in the inputs' precision and in float64; check the output and the gradient
    of every input (for one random output gradient) with :func:`assert_within_reference_error`.

    ``inputs`` are the floating-point tensors to differentiate, all of one dtype; anything else an op needs (ids,
    lengths, options) is closed over by the two callables. Returns the fused output.
    """
    dtype = inputs[0].dtype
    names = list(names) if names else [str(i) for i in range(len(inputs))]

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_(grads) for t in inputs]
        out = fn(leaves)
        if not grads:
            return out, []
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
        return out, list(torch.autograd.grad(out, leaves, g))

    out, got = run(fused, dtype)
    same_out, same = run(ref, dtype)
    exact_out, exact = run(ref, torch.float64)
    assert out.dtype == dtype and out.shape == exact_out.shape
    assert_within_reference_error(["output"], [out], [same_out], [exact_out], dtype)
    for name, a in zip(names, got):
        assert a.dtype == dtype, name
    if grads:
        assert_within_reference_error([f"grad {n}" for n in names], got, same, exact, dtype)
    return out
