"""Checks of the full-ranking path (issue 10) on a MovieLens-20M-shaped release.

    python benchmarks/ranking_check.py ranks RELEASE_DIR --cache-dir CACHE [--users 5120]
    python benchmarks/ranking_check.py count
    python benchmarks/ranking_check.py parts RELEASE_DIR --cache-dir CACHE [--users 10240] [--batch-size 256]

``ranks``: the ranks of N random test users (seen items filtered) computed as the code before the
last-position cut did (full encoder forward, the last real position gathered, ``matmul + bias``, a bool
``>=`` count) against :func:`userllm.ranking.rank_in_place` on ``score_next`` (the last block at the last
event only, ``addmm``, the in-place float count), and the old path against itself at another batch size;
untrained default encoder (its near-tied scores make it the hardest case for rounding). Prints JSON:
how many ranks differ and by how much.
``parts``: CPU seconds of each part of the ranking of the first N test users (gather, seen lists, event
embedding, encoder block 1, block 2 at the last event, scoring GEMM, rank count, popularity), and their sum
extrapolated to all users; ``--full-forward`` times block 2 at every position as before the cut.
``count``: CPU milliseconds per batch of 256 x 26,739 of the ways to count ``scores >= target`` per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from userllm.config import PretrainConfig  # noqa: E402
from userllm.data import load_dataset, next_item_eval  # noqa: E402
from userllm.data.examples import collate  # noqa: E402
from userllm.data.vocab import UNK_ID  # noqa: E402
from userllm.encoders import build_encoder  # noqa: E402
from userllm.ranking import history_pairs, rank_in_place  # noqa: E402


def check_ranks(args) -> dict:
    ds = load_dataset("movielens", args.release, cache_dir=args.cache_dir)
    cfg = PretrainConfig(dataset="movielens", data_path=args.release)
    ev = next_item_eval(ds, cfg.window, "test")
    torch.manual_seed(0)
    enc = build_encoder(cfg.encoder, cfg.encoder_spec(ds)).eval()
    idx = np.random.default_rng(0).choice(len(ev), min(args.users, len(ev)), replace=False)
    idx = idx[ev.examples.labels[idx] > 0]

    def old_ranks(b):
        batch = collate(ds, ev.examples, b)
        row, item = (torch.from_numpy(a) for a in history_pairs(ev, b))
        out = enc(batch.features, batch.lengths)
        last = (out.mask.sum(1) - 1).clamp_min(0)
        h = out.embeddings[torch.arange(len(last)), last]
        s = enc.head_proj["item"](h) @ enc.tables["item"].t() + enc.head_bias["item"]
        rows = torch.arange(len(b))
        t = s[rows, batch.labels].clone()
        s[:, UNK_ID] = float("nan")
        s[row, item] = float("nan")
        s[rows, batch.labels] = float("nan")
        return (s >= t[:, None]).sum(1)

    def new_ranks(b):
        batch = collate(ds, ev.examples, b)
        seen = tuple(torch.from_numpy(a) for a in history_pairs(ev, b))
        return rank_in_place(enc.score_next(batch.features, batch.lengths), batch.labels, seen)

    def run(f, bs):
        return torch.cat([f(idx[a:a + bs]) for a in range(0, len(idx), bs)])

    def compare(a, b):
        d = (a - b).abs()
        return {"differing": int((d > 0).sum()), "max_rank_diff": int(d.max())}

    with torch.inference_mode():
        o256, o100, n256 = run(old_ranks, 256), run(old_ranks, 100), run(new_ranks, 256)
    return {"users": len(idx), "old_vs_new": compare(o256, n256), "old_batch256_vs_batch100": compare(o256, o100)}


def parts(args) -> dict:
    from userllm.encoders.pretraining import train_item_counts
    from userllm.ranking import PopularityRanks

    ds = load_dataset("movielens", args.release, cache_dir=args.cache_dir)
    cfg = PretrainConfig(dataset="movielens", data_path=args.release)
    ev = next_item_eval(ds, cfg.window, "test")
    torch.manual_seed(0)
    enc = build_encoder(cfg.encoder, cfg.encoder_spec(ds)).eval()
    pop = PopularityRanks(train_item_counts(ds))
    spent: dict[str, float] = {}
    clock = [time.process_time()]

    def tick(name: str) -> None:
        now = time.process_time()
        spent[name] = spent.get(name, 0.0) + now - clock[0]
        clock[0] = now

    n = min(args.users, len(ev))
    with torch.inference_mode():
        for a in range(0, n, args.batch_size):
            b = np.arange(a, min(n, a + args.batch_size))
            clock[0] = time.process_time()
            batch = collate(ds, ev.examples, b)
            tick("gather")
            seen = tuple(torch.from_numpy(x) for x in history_pairs(ev, b))
            tick("seen_lists")
            x = enc.embed(batch.features)
            tick("embedding")
            last = (batch.lengths.clamp(max=x.shape[1]) - 1).clamp_min(0)
            x = enc.transformer.blocks[0](x)
            tick("block1")
            if args.full_forward:
                h = enc.transformer.ln_f(enc.transformer.blocks[1](x))[torch.arange(len(b)), last]
            else:
                h = enc.transformer.ln_f(enc.transformer.blocks[1].forward_last(x, last))
            tick("block2")
            scores = enc.feature_logits(h, "item").float()
            tick("scoring")
            rank_in_place(scores, batch.labels, seen)
            tick("rank_count")
            pop.ranks(batch.labels, seen)
            tick("popularity")
    total = sum(spent.values())
    return {"users": n, "batch_size": args.batch_size, **{k: round(v, 3) for k, v in spent.items()},
            "total_cpu_s": round(total, 2), "all_users_cpu_s": round(total * len(ev) / n, 1)}


def bench_count(rounds: int = 20) -> dict:
    B, I = 256, 26_739
    s = torch.randn(B, I, generator=torch.Generator().manual_seed(0))
    t = s[:, 5].clone()[:, None]
    ways = {"bool_sum_int64": lambda: (s >= t).sum(1), "bool_sum_int32": lambda: (s >= t).sum(1, dtype=torch.int32),
            "in_place_float": lambda: s.clone().sub_(t).ge_(0).sum(1), "clone_only": lambda: s.clone()}
    out = {}
    for name, f in ways.items():
        f()
        c = time.process_time()
        for _ in range(rounds):
            f()
        out[name] = round((time.process_time() - c) / rounds * 1e3, 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("ranks")
    r.add_argument("release")
    r.add_argument("--cache-dir", default=None)
    r.add_argument("--users", type=int, default=5120)
    sub.add_parser("count")
    pa = sub.add_parser("parts")
    pa.add_argument("release")
    pa.add_argument("--cache-dir", default=None)
    pa.add_argument("--users", type=int, default=10240)
    pa.add_argument("--batch-size", type=int, default=256)
    pa.add_argument("--threads", type=int, default=1)
    pa.add_argument("--full-forward", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    run = {"ranks": check_ranks, "parts": parts}.get(args.what)
    print(json.dumps(run(args) if run else bench_count()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
