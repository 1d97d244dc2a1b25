"""How glibc's allocator treats the large, short-lived CPU tensors of a run (one setting per kind of loop).

CPU tensors come from ``malloc``. glibc serves a block from its heap, or, from the mmap threshold up, with a
fresh ``mmap`` that ``free`` returns to the kernel; the next such block then costs a page fault per 4 KiB
page, the kernel zeroing each page. Two loops want opposite settings:

* **Training steps** (:func:`reuse_freed_memory`, set by :func:`userllm.data.loader.make_loader`) allocate
  the same large temporaries every step. The AR encoder's pretraining on ml-latest-small builds
  [64, 50, 9725] logits (124 MB) and their softmax and gradients each step; with those blocks mmap'ed,
  40 steps + an evaluation took 9.0M page faults and 32.6 s of system time against 39.3 s of user time.
  Served from a heap that is never handed back in pieces under 1 GiB: 0.40M faults, 2.0 s of system time,
  user time unchanged (37.2 s), identical results; peak RSS 1.70 GB instead of 0.95 GB (the heap keeps
  its high-water mark). With a 256 MiB trim threshold the heap was still trimmed and refilled every
  step: 2.4M faults, 8.4 s. (``python -m userllm.pretrain --dataset movielens --data-path
  ../shared/data/movielens/ml-latest-small --steps 40 --threads 1``, 2026-12-01, shared 2-core machine.)
* **Batches of varying shapes kept in lists** (:func:`varying_shapes`, around the full-ranking evaluation):
  by default glibc raises its threshold to the size of any mmap'ed block freed (up to 32 MiB), after
  which such blocks come from the heap and fragment it: the full-ranking evaluation of MovieLens-20M (540
  batches of [256, 26739] scores) grew by ~12 MB of RSS per batch, to a 5.7 GB peak, and stayed flat at
  1.47 GB with the threshold pinned at 64 KiB (benchmarks/scale_probe.py). The price is a page fault per
  page of every block from 64 KiB up, the encoder's activations too: once the CPU ranking scored in tiles
  (no [B, I] tensor left to fragment the heap, ``userllm.ranking.rank_tiled``), the pinned threshold made
  it 6.3-6.6 CPU s for 10,240 users against 4.1-5.5 with glibc's own settings or "reuse", so that path
  no longer sets it (``benchmarks/ranking_check.py parts --malloc``, benchmarks/RESULTS.md).

Both are process-wide (forked DataLoader workers inherit them) and no-ops without glibc (musl, macOS).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Callable, Iterator

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's default cap on the number of mmap'ed blocks (restored when mmap is wanted again).
_GLIBC_MMAP_MAX = 65536
#: Ranking: blocks from 64 KiB up are mmap'ed and returned to the system when freed.
MMAP_THRESHOLD_BYTES = 64 << 10
#: Training: free memory at the heap's top is returned only beyond this much (see the module docstring).
TRIM_THRESHOLD_BYTES = 1 << 30

# The policy in force: "default" (glibc's own), "reuse" or "varying".
_policy = "default"


@functools.lru_cache(maxsize=None)
def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):   # not glibc
        return None


def _set(policy: str) -> bool:
    global _policy
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if policy == "reuse":
        ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    elif policy == "varying":
        ok = mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    else:
        raise ValueError(f"unknown memory policy {policy!r}")
    _policy = policy
    return bool(ok)


def current_policy() -> str:
    """The policy set by this module: "default" (none yet), "reuse" or "varying"."""
    return _policy


def reuse_freed_memory() -> bool:
    """Training loops: every block from the heap, kept for reuse (True when set, False without glibc)."""
    return _set("reuse")


@contextlib.contextmanager
def varying_shapes() -> Iterator[bool]:
    """Within: large blocks mmap'ed and returned when freed (yields whether it was set). A training loop's
    "reuse" policy is restored afterwards, so a run that evaluates between steps keeps reusing its memory;
    otherwise the setting stays (a process that only evaluates)."""
    before = _policy
    ok = _set("varying")
    try:
        yield ok
    finally:
        if before == "reuse" and ok:
            _set("reuse")
