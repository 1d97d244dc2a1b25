"""What bounds the native CPU ``embedding_concat`` forward on issue 15's shape (64 x 200 events; item 100k x 64,
rating 10 x 8, genres 20 x 32 with 1-8 of 8; fp32): the op against the embedding_bag peer and against two
yardsticks measured in the same interleaved rounds, by process CPU time (the machine is shared: see
``conftest.interleaved``):

  item_gather   ``torch.index_select`` of the 12,800 item rows (256 B each, random in a 25.6 MB table): the
                random-row misses every implementation must take, with nothing else (no other feature, no
                concatenated output); the op cannot be faster than this.
  copy          ``dst.copy_(src)`` of the bytes the op moves (embedding_bytes), at the measured copy bandwidth.

Modes: ``warm`` (candidates called back to back, as benchmarks/test_native_cpu.py does with its 5 candidates
minus the eager reference) and ``cold`` (48 MB written, untimed, before every call, so the item table and the
output start out of cache, as on a machine whose neighbours evict them).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/cpu_forward_bounds.py --rounds 60 --json bounds.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from peers import embedding_bag_concat, embedding_bytes  # noqa: E402
from test_native_cpu import SHAPES, inputs  # noqa: E402
from userllm.kernels import native  # noqa: E402

FLUSH_BYTES = 48 << 20  # > the VM's L3 share: evicts the 25.6 MB item table and the 5.3 MB output


def measure(candidates: dict, rounds: int, cold: bool) -> dict[str, list[float]]:
    """CPU seconds per call of each candidate, interleaved (one call of each per round)."""
    flush = torch.empty(FLUSH_BYTES // 4)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            if cold:
                flush.fill_(1.0)
            c0 = time.process_time()
            fn()
            times[name].append(time.process_time() - c0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.rounds < 3 or args.threads < 1:
        print("cpu_forward_bounds: --rounds must be >= 3 and --threads >= 1", file=sys.stderr)
        return 2
    if not native.available("cpu"):
        print("cpu_forward_bounds: the native library is not built (cmake -S . -B build && cmake --build build)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    ids, tables = inputs(SHAPES["issue15"])
    tables = [t.detach() for t in tables]
    moved = embedding_bytes(ids, tables)
    item_ids = ids[0].reshape(-1)
    src = torch.empty(int(moved) // 8, dtype=torch.float32)  # read + write = moved bytes
    dst = torch.empty_like(src)
    candidates = {
        "native": lambda: native.embedding_concat(ids, tables, "mean"),
        "embedding_bag": lambda: embedding_bag_concat(ids, tables, "mean"),
        "item_gather": lambda: torch.index_select(tables[0], 0, item_ids),
        "copy": lambda: dst.copy_(src),
    }
    report = {"shape": "issue15", "threads": args.threads, "rounds": args.rounds, "bytes_moved": moved,
              "timing": "process CPU time", "load_average": [round(x, 2) for x in os.getloadavg()]}
    with torch.no_grad():
        for mode in ("warm", "cold"):
            times = measure(candidates, args.rounds, cold=mode == "cold")
            stats = {}
            for name, t in times.items():
                q = statistics.quantiles(t, n=4)
                med = statistics.median(t)
                stats[name] = {"cpu_median_ms": round(med * 1e3, 4), "spread": round((q[2] - q[0]) / med, 3)}
            med = {name: s["cpu_median_ms"] for name, s in stats.items()}
            report[mode] = {
                "candidates": stats,
                "peer_over_native": round(med["embedding_bag"] / med["native"], 3),
                "native_over_item_gather": round(med["native"] / med["item_gather"], 3),
                "native_GB/s": round(moved / med["native"] / 1e6, 3),
                "copy_GB/s": round(moved / med["copy"] / 1e6, 3),
            }
            print(f"{mode}: " + ", ".join(f"{n} {s['cpu_median_ms']:.3f} ms ({s['spread']:.2f})"
                                          for n, s in stats.items())
                  + f"; peer/native {report[mode]['peer_over_native']:.2f}x, native/item_gather "
                    f"{report[mode]['native_over_item_gather']:.2f}x, native {report[mode]['native_GB/s']:.2f} GB/s"
                    f" vs copy {report[mode]['copy_GB/s']:.2f} GB/s")
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
