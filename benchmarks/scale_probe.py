"""Measurements of the scale suite that need a process of their own (so that its peak RSS is theirs alone).

    python benchmarks/scale_probe.py eval RELEASE_DIR --cache-dir CACHE [--threads 2] [--filter-seen]

``eval``: loads the processed release (from the cache when warm), builds the test split's full-ranking set
(every user, every item) and ranks it with :func:`userllm.ranking.evaluate_next_item` using the default
pretraining encoder (``python -m userllm.pretrain``'s defaults, untrained: the cost does not depend on the
weights) and the popularity baseline. Prints one JSON line: users, items, load_s, prepare_s, eval_s (wall), eval_cpu_s (CPU seconds of all threads: what a contended machine
cannot inflate the way it inflates wall time),
peak_rss_bytes (the process's ``VmHWM``), device, threads and the metrics.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from userllm.data import load_dataset, next_item_eval  # noqa: E402
from userllm.encoders import build_encoder  # noqa: E402
from userllm.config import PretrainConfig  # noqa: E402
from userllm.encoders.pretraining import train_item_counts  # noqa: E402
from userllm.ranking import EVAL_BATCH_SIZE, evaluate_next_item  # noqa: E402
from userllm.loop import pick_device  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would include the launching process's peak, which
    Linux carries across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # not Linux: KiB on Linux, bytes on macOS


def run_eval(args) -> dict:
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    t0 = time.time()
    ds = load_dataset("movielens", args.release, cache_dir=args.cache_dir)
    t1 = time.time()
    cfg = PretrainConfig(dataset="movielens", data_path=args.release)
    evalset = next_item_eval(ds, cfg.window, "test")
    popularity = train_item_counts(ds)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.encoder, cfg.encoder_spec(ds)).to(device)
    t2, c2 = time.time(), time.process_time()
    metrics = evaluate_next_item(encoder, ds, evalset, np.arange(len(evalset)), device, args.filter_seen,
                                 popularity, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t3, c3 = time.time(), time.process_time()
    out = {"users": len(evalset), "items": ds.num_items - 1, "load_s": round(t1 - t0, 2),
           "prepare_s": round(t2 - t1, 2), "eval_s": round(t3 - t2, 2),
           "eval_cpu_s": round(c3 - c2, 2), "peak_rss_bytes": peak_rss_bytes(),
           "device": str(device), "threads": torch.get_num_threads(), "filter_seen": args.filter_seen,
           "metrics": metrics}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ev = sub.add_parser("eval", help="full-ranking evaluation of every user of a release")
    ev.add_argument("release")
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    ev.add_argument("--filter-seen", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run_eval(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
