"""Shared helpers of the kernel benchmarks (pytest-benchmark).

* ``DEVICE``: "cuda" when a GPU is visible, else "cpu" (small shapes there).
* ``median_seconds(fn)``: GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed, median), or its CUDA
  graph replay variant for microsecond kernels; CPU: median wall time of repeated calls.
* ``copy_bandwidth()``: the device's measured copy bandwidth (bytes/s, read + write), the yardstick of the
  memory-bound targets.
* the ``compare`` fixture: times every candidate of one op on the same inputs, records medians, speedups of
  the fused op over each peer, GB/s and TFLOP/s in ``benchmark.extra_info``, and gives pytest-benchmark
  the fused op itself. Under ``--benchmark-disable`` (CI, small shapes) each candidate runs once and its
  output is checked against the eager reference instead, so the suite cannot rot.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from typing import Callable

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], cuda_graph: bool = False, budget_s: float = 0.5) -> float:
    """Median run time of ``fn`` in seconds (see the module docstring)."""
    if DEVICE == "cuda":
        import triton.testing

        if cuda_graph:
            try:  # graph replay removes launch overhead; a candidate that syncs cannot be captured
                return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
            except RuntimeError:
                torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up (and lazy initialization)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> float:
    """Measured device-to-device (or RAM-to-RAM) copy bandwidth in bytes/s, counting read + write."""
    n = (256 << 20) if DEVICE == "cuda" else (32 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * n / median_seconds(lambda: dst.copy_(src))


def device_info() -> dict:
    info = {"device": DEVICE, "torch": torch.__version__, "machine": platform.machine()}
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu_threads"] = torch.get_num_threads()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


@pytest.fixture
def flash_attn():
    """The flash_attn package when importable on a GPU, else None."""
    if DEVICE != "cuda":
        return None
    try:
        import flash_attn as fa
    except ImportError:
        return None
    return fa


def _close(a, b, tol: float) -> bool:
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    for x, y in zip(a, b):
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        if (x - y).norm() > tol * y.norm().clamp_min(1e-12) + 1e-6:
            return False
    return True


@pytest.fixture
def compare(benchmark):
    """``compare(candidates, fused, bytes_moved=None, flops=None, cuda_graph=False, check=None, tol=...)``.

    candidates: name -> zero-argument callable (the eager reference first, under the name "eager");
    fused: the name of the candidate under test. ``check`` maps a candidate's return value to the tensors
    compared against the eager reference's (default: the value itself).
    """
    def run(candidates: dict[str, Callable[[], object]], fused: str, bytes_moved: float | None = None,
            flops: float | None = None, cuda_graph: bool = False, check: Callable | None = None,
            tol: float = 2e-2) -> None:
        check = check or (lambda x: x)
        if benchmark.disabled:
            want = check(candidates["eager"]())
            for name, fn in candidates.items():
                assert _close(check(fn()), want, tol), f"{name} disagrees with the eager reference"
            benchmark(candidates[fused])
            return
        info = benchmark.extra_info
        info.update(device_info())
        medians = {name: median_seconds(fn, cuda_graph=cuda_graph) for name, fn in candidates.items()}
        info["median_ms"] = {name: round(t * 1e3, 4) for name, t in medians.items()}
        info["speedup_of_" + fused] = {name: round(t / medians[fused], 3) for name, t in medians.items()
                                       if name != fused}
        if bytes_moved:
            gbps = bytes_moved / medians[fused] / 1e9
            info["GB/s"] = float(f"{gbps:.4g}")
            info["fraction_of_copy_bandwidth"] = round(gbps * 1e9 / copy_bandwidth(), 3)
        if flops:
            info["TFLOP/s"] = float(f"{flops / medians[fused] / 1e12:.4g}")
        fn = candidates[fused]

        def timed():
            fn()
            sync()

        benchmark.pedantic(timed, rounds=20 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=1)

    return run
