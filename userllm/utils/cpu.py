"""How many CPU cores a run may use without fighting other work for them (``--threads 0``).

The embedded tiny LLM's matmuls ([1344, 128] x [128, 512] in a default training step) split well over
the cores of an idle machine but collapse on a busy one, where torch's threads spin waiting for each
other. Measured on the 2-core machine (``python -m userllm.train`` defaults, 2026-12-01):

| | 1 thread | 2 threads |
| --- | --- | --- |
| training step, idle machine | 258 ms | 170 ms (1.52x) |
| LLM pretraining step, idle machine | 391 ms | 302 ms (1.30x) |
| training step, 4-5 other jobs running | 0.53 s | 5.3 s (10x slower) |

So the automatic choice counts the cores that are idle right now: it samples the whole machine's CPU time
(``/proc/stat``) over a quarter of a second, before this process starts working. ``OMP_NUM_THREADS``,
when set, is taken as given (the test suite sets it to 1, so its bit-exact resume checks do not depend on
the machine's load).
"""

from __future__ import annotations

import os
import time

#: How long the machine's CPU use is sampled.
SAMPLE_SECONDS = 0.25


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores since boot, or None where /proc/stat is unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]          # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def idle_cores(sample_seconds: float = SAMPLE_SECONDS) -> int:
    """Cores of :func:`usable_cores` not busy with other work right now (at least 1; 1 where it cannot be
    measured)."""
    cores = usable_cores()
    before = _cpu_jiffies()
    if before is None or cores == 1:
        return 1
    time.sleep(sample_seconds)
    after = _cpu_jiffies()
    if after is None or after[1] <= before[1]:
        return 1
    busy_share = (after[0] - before[0]) / (after[1] - before[1])     # of all the machine's cores
    busy = busy_share * (os.cpu_count() or cores)
    return max(1, min(cores, int(cores - busy + 0.5)))


def automatic_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else :func:`idle_cores`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return idle_cores()
