"""Measurements of the scale suite that need a process of their own (so that its peak RSS is theirs alone).

    python benchmarks/scale_probe.py eval RELEASE_DIR --cache-dir CACHE [--threads 2] [--filter-seen] [--malloc reuse]
    python benchmarks/scale_probe.py start RELEASE_DIR --cache-dir CACHE [--stride 1]

``eval``: loads the processed release (from the cache when warm), builds the test split's full-ranking set
(every user, every item) and ranks it with :func:`userllm.ranking.evaluate_next_item` using the default
pretraining encoder (``python -m userllm.pretrain``'s defaults, untrained: the cost does not depend on the
weights) and the popularity baseline. Prints one JSON line: users, items, load_s, prepare_s, eval_s (wall), eval_cpu_s (CPU seconds of all threads: what a contended machine
cannot inflate the way it inflates wall time),
peak_rss_bytes (the process's ``VmHWM``), device, threads and the metrics.

``start``: ``python -m userllm.pretrain --dataset movielens --data-path RELEASE_DIR --stride S --steps 1``
in this process, timed from the process start (before anything of userllm is imported) to the moment its
first batch has been gathered: wall and CPU seconds at each stage (imports, dataset, windows, evaluation
sets, first batch), one JSON line, and the peak RSS of the whole run. The evaluation is cut to 100 users.
"""

from __future__ import annotations

import time

T0, C0 = time.time(), time.process_time()          # the process start, before userllm's imports

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

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
    if args.malloc == "reuse":          # as in a training process (userllm.data.loader.make_loader sets it)
        from userllm.utils.memory import reuse_freed_memory
        reuse_freed_memory()
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
           "malloc": args.malloc,
           "metrics": metrics}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def run_start(args) -> dict:
    """The stages of a ``userllm.pretrain`` start up to its first batch (see the module docstring)."""
    import tempfile

    marks: dict[str, tuple[float, float]] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, (round(time.time() - T0, 2), round(time.process_time() - C0, 2)))

    from userllm import pretrain as stage
    from userllm.data import examples, loader
    mark("imports")

    def timed(obj, name, label):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            out = fn(*a, **k)
            mark(label)
            return out
        setattr(obj, name, wrapper)

    timed(stage, "load_data", "dataset")
    timed(examples.PretrainWindows, "__init__", "windows")
    timed(stage, "train_item_counts", "evaluation_sets")
    timed(loader.WindowDataset, "__getitem__", "first_batch")
    with tempfile.TemporaryDirectory() as tmp:
        stage.main(["--dataset", "movielens", "--data-path", args.release, "--stride", str(args.stride),
                    "--steps", "1", "--max-eval-users", "100", "--out", str(Path(tmp) / "run"),
                    *(["--cache-dir", args.cache_dir] if args.cache_dir else [])])
    return {"stride": args.stride, **{f"{k}_wall_s": v[0] for k, v in marks.items()},
            **{f"{k}_cpu_s": v[1] for k, v in marks.items()}, "peak_rss_bytes": peak_rss_bytes()}


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
    ev.add_argument("--malloc", choices=("default", "reuse"), default="default",
                    help="glibc's settings: its own (an evaluation-only process) or a training process's reuse")
    st = sub.add_parser("start", help="time python -m userllm.pretrain from the process start to its first batch")
    st.add_argument("release")
    st.add_argument("--cache-dir", default=None)
    st.add_argument("--stride", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(run_eval(args) if args.what == "eval" else run_start(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
