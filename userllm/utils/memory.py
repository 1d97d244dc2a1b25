"""Process memory settings for long loops over varying batch shapes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's mallopt parameter number of M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
#: Blocks from 64 KiB up are mmap'ed and returned to the system when freed.
MMAP_THRESHOLD_BYTES = 64 << 10


@functools.lru_cache(maxsize=None)
def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (once per process; True when it was set, False without glibc).

    By default glibc raises the threshold to the size of any mmap'ed block freed (up to 32 MiB), after which
    such blocks come from the heap, and batches of varying shapes fragment it: the full-ranking evaluation
    of MovieLens-20M (540 batches of [256, 26739] scores) grew by ~12 MB of RSS per batch, to a 5.7 GB peak,
    and stayed flat at 1.47 GB with the threshold pinned at 64 KiB (benchmarks/scale_probe.py; the same as
    ``MALLOC_MMAP_THRESHOLD_=65536``). Forked DataLoader workers inherit the setting.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl, macOS)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
