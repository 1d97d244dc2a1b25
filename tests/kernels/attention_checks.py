"""What the two attention-kernel test modules share: the forward + gradient comparison of a fused attention op
against its reference, under flash-attn's rule (``precision.py``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from precision import check_op


def assert_matches_reference(fused: Callable, ref: Callable, inputs: Sequence[torch.Tensor],
                             lengths: torch.Tensor, names: Sequence[str], **options) -> torch.Tensor:
    """fused(*inputs, lengths, **options) against ref(...) in the same precision and in float64: the output, then
    the gradients of every input for one random output gradient; dtypes preserved."""
    return check_op(lambda xs: fused(*xs, lengths, **options), lambda xs: ref(*xs, lengths, **options),
                    inputs, names)
