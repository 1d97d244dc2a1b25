"""Timing and peak memory of a block of code on CPU or GPU.

    with Timer(device) as t:
        step()
    t.result   # TimingResult(wall_s, device_s, cpu_s, peak_mem_bytes, peak_rss_bytes, ...)

On CUDA the block is bracketed by CUDA events (device time, after ``torch.cuda.synchronize``) and the
peak of ``torch.cuda.max_memory_allocated`` is reset at entry and read at exit. On CPU the device time
is the wall-clock time (``time.perf_counter``); the process CPU time (``time.process_time``, all threads)
and the peak resident set size are recorded too. The RSS peak is reset at entry through
``/proc/self/clear_refs`` (Linux >= 4.0) so it is the block's peak; where that is not possible it is the
process-lifetime peak and ``rss_peak_scope`` says so.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass
class TimingResult:
    device: str
    wall_s: float                      # perf_counter around the block, after synchronising
    device_s: float                    # CUDA-event time on GPU; equals wall_s on CPU
    cpu_s: float                       # process CPU time (user + system) spent in the block
    peak_mem_bytes: int | None         # torch.cuda.max_memory_allocated on GPU, None on CPU
    peak_rss_bytes: int | None         # peak resident set size of the process
    rss_peak_scope: str                # "block" (reset at entry) or "process" (lifetime peak)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def _reset_rss_peak() -> bool:
    """Reset the kernel's VmHWM counter for this process (``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """VmHWM from /proc/self/status on Linux, else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


class Timer:
    """Context manager timing a block on ``device``; the result is in ``.result`` after exit."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.result: TimingResult | None = None
        self._cuda = self.device.type == "cuda"

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._rss_scope = "block" if _reset_rss_peak() else "process"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_ev = torch.cuda.Event(enable_timing=True)
            self._end_ev = torch.cuda.Event(enable_timing=True)
            self._start_ev.record()
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._end_ev.record()
        synchronize(self.device)
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._cpu0
        device_s = self._start_ev.elapsed_time(self._end_ev) / 1000.0 if self._cuda else wall
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self._cuda else None
        self.result = TimingResult(str(self.device), wall, device_s, cpu, peak, peak_rss_bytes(), self._rss_scope)


def time_fn(fn: Callable[[], Any], device: torch.device | str | None = None, repeats: int = 3,
            warmup: int = 1) -> list[TimingResult]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times each under a :class:`Timer`."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        out.append(t.result)
    return out
