"""The environment reads that both the dispatcher and the Triton op modules need (a leaf: it imports nothing
from :mod:`userllm.kernels`, so the op modules need not import :mod:`userllm.kernels.dispatch`, which imports
them, and no import circle forms inside ``kernels/``)."""

from __future__ import annotations

import os

#: The environment variable naming the kernel backend (see :mod:`userllm.kernels.dispatch`).
ENV_VAR = "USERLLM_KERNEL_BACKEND"


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter now (what kernels decorated now will use)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
