"""Shared test fixtures and session set-up.

``shared_data`` locates the read-only real data beside the checkout (``../shared/data``, or the
directory named by ``USERLLM_SHARED_DATA``) and skips the test cleanly when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The switch must be set before anything
# imports triton (torch.compile, peft and the kernel modules all may): triton decorates its own standard
# library at import time, and a compiled-mode helper cannot be called from an interpreted kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread everywhere (subprocesses inherit it): `--threads 0` would otherwise count the idle cores
# (userllm.utils.cpu), and the bit-exact resume checks need the same thread count in both runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_data_dir() -> Path | None:
    env = os.environ.get("USERLLM_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: their matmuls are too small to gain from a second
    thread, and on a shared 2-core machine waiting for it made them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
