"""Kernel tests: without a GPU the Triton kernels must run in Triton's interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` for the session before anything imports triton; this
guard turns a broken set-up into one clear failure instead of dozens of obscure interpreter errors.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_runs_here():
    if torch.cuda.is_available():
        return
    from userllm.kernels import dispatch

    if not dispatch.triton_interpreted():
        pytest.fail("the Triton kernels were imported without TRITON_INTERPRET=1; tests/conftest.py must set it "
                    "before anything imports triton")
