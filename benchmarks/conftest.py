"""Shared helpers of the kernel benchmarks (pytest-benchmark).

* ``DEVICE``: "cuda" when a GPU is visible, else "cpu" (small shapes there).
* ``median_seconds(fn)``: GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed, median), or its CUDA
  graph replay variant for microsecond kernels; CPU: median wall time of repeated calls.
* ``copy_bandwidth()``: the device's measured copy bandwidth (bytes/s, read + write), the yardstick of the
  memory-bound targets.
* ``interleaved(candidates)``: every candidate timed in interleaved rounds (one call of each per round,
  in turn), so that a load change on the shared machine hits all of them alike; per candidate the median,
  the interquartile spread and the rounds.
* the ``compare`` fixture: times every candidate of one op on the same inputs (``interleaved``), records
  medians, spreads, speedups of the fused op over each peer, GB/s and TFLOP/s in
  ``benchmark.extra_info``, and gives pytest-benchmark the fused op itself. Under ``--benchmark-disable`` (CI, small shapes) each candidate runs once and its
  output is checked against the eager reference instead, so the suite cannot rot.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Callable

import pytest
import torch

from peers import TINY

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# torch.compile'd peers see several shapes, grad modes and thread counts per function (one Dynamo cache
# entry each): the default limit of 8 recompilations would turn the 9th into a hard error under fullgraph
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)



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


def interleaved(candidates: dict[str, Callable[[], object]], budget_s: float = 3.0, min_rounds: int = 7,
                max_rounds: int = 200, cuda_graph: bool = False) -> dict[str, dict]:
    """Time every candidate in interleaved rounds; returns name -> {median_ms, spread, rounds} plus, on CPU,
    cpu_median_ms and cpu_spread.

    CPU: a round is one call of each candidate in turn (after one warm-up call each), timed both by the
    wall clock and by the process's CPU time; rounds continue until ``budget_s`` is spent (at least
    ``min_rounds``). CUDA: a round is one ``median_seconds`` (do_bench) of each candidate; 3 rounds.
    ``spread`` is the interquartile range over the median: the noise of the figure on a machine shared
    with other jobs.

    Why CPU time on CPU: the 2-core machine these benchmarks were run on is shared by several agents (load
    average 14-18 during the runs of 2026-12-01), and a wall-clock median there mostly measures when the
    scheduler let the process run (spreads up to 20x). The CPU time a call consumed is what the code
    costs; it still carries the cache pollution of the neighbours, hence the interleaving. (With 2 threads
    it also counts OpenMP's spin-waiting, a real cost on a loaded machine.)
    """
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    if DEVICE == "cuda":
        for _ in range(3):
            for name, fn in candidates.items():
                wall[name].append(median_seconds(fn, cuda_graph=cuda_graph))
    else:
        for fn in candidates.values():
            fn()
        deadline = time.perf_counter() + budget_s
        while True:
            for name, fn in candidates.items():
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            rounds = len(wall[name])
            if rounds >= max_rounds or (rounds >= min_rounds and time.perf_counter() > deadline):
                break

    def summary(t: list[float]) -> tuple[float, float]:
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        med = statistics.median(t)
        return med * 1e3, (q[2] - q[0]) / med if med else 0.0

    out = {}
    for name in candidates:
        med, spread = summary(wall[name])
        out[name] = {"median_ms": med, "spread": spread, "rounds": len(wall[name])}
        if cpu[name]:
            out[name]["cpu_median_ms"], out[name]["cpu_spread"] = summary(cpu[name])
    return out


def copy_bandwidth() -> float:
    """Measured device-to-device (or RAM-to-RAM) copy bandwidth in bytes/s, counting read + write; on CPU
    at the current thread count and by the same clock as the benchmarks (CPU time, see interleaved)."""
    return _copy_bandwidth(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _copy_bandwidth(threads: int) -> float:
    n = (256 << 20) if DEVICE == "cuda" else (32 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    if DEVICE == "cuda":
        return 2 * n / median_seconds(lambda: dst.copy_(src))
    stats = interleaved({"copy": lambda: dst.copy_(src)}, budget_s=1.0)["copy"]
    return 2 * n / (stats["cpu_median_ms"] / 1e3)


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
        stats = interleaved(candidates, cuda_graph=cuda_graph, **(dict(budget_s=0.0, min_rounds=2) if TINY else {}))
        # the figure of merit: CUDA: do_bench medians; CPU: CPU-time medians (see interleaved)
        key = "cpu_median_ms" if DEVICE == "cpu" else "median_ms"
        medians = {name: st[key] / 1e3 for name, st in stats.items()}
        info["timing"] = "process CPU time" if DEVICE == "cpu" else "do_bench"
        info["median_ms"] = {name: round(t * 1e3, 4) for name, t in medians.items()}
        info["spread"] = {name: round(st["cpu_spread" if DEVICE == "cpu" else "spread"], 3)
                          for name, st in stats.items()}
        if DEVICE == "cpu":
            info["wall_median_ms"] = {name: round(st["median_ms"], 4) for name, st in stats.items()}
            info["wall_spread"] = {name: round(st["spread"], 3) for name, st in stats.items()}
            info["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine meanwhile
        info["rounds"] = max(st["rounds"] for st in stats.values())
        info["speedup_of_" + fused] = {name: round(t / medians[fused], 3) for name, t in medians.items()
                                       if name != fused}
        if bytes_moved:
            gbps = bytes_moved / medians[fused] / 1e9
            info["GB/s"] = float(f"{gbps:.4g}")
            info["copy_GB/s"] = float(f"{copy_bandwidth() / 1e9:.4g}")
            info["fraction_of_copy_bandwidth"] = round(gbps * 1e9 / copy_bandwidth(), 3)
        if flops:
            info["TFLOP/s"] = float(f"{flops / medians[fused] / 1e12:.4g}")
        fn = candidates[fused]

        def timed():
            fn()
            sync()

        benchmark.pedantic(timed, rounds=20 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=1)

    return run
