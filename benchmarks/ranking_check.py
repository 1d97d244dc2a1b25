"""Checks of the full-ranking path (issue 10) on a MovieLens-20M-shaped release.

    python benchmarks/ranking_check.py ranks RELEASE_DIR --cache-dir CACHE [--users 5120]
    python benchmarks/ranking_check.py count
    python benchmarks/ranking_check.py gemm
    python benchmarks/ranking_check.py batch-sizes RELEASE_DIR --cache-dir CACHE [--users 10240] [--sizes 64,128,256]
    python benchmarks/ranking_check.py parts RELEASE_DIR --cache-dir CACHE [--users 10240] [--batch-size 256] \
        [--variants full,sorted,tiled,sorted_tiled] [--malloc varying|reuse|default]

``ranks``: the ranks of N random test users (seen items filtered) computed as the code before the
last-position cut did (full encoder forward, the last real position gathered, ``matmul + bias``, a bool
``>=`` count, batches in the random order) against :func:`userllm.ranking.next_item_ranks` (the last block
at the last event only, batches sorted by history length, :func:`userllm.ranking.rank_tiled`), against
``rank_tiled`` in the old path's batches, and the old path against itself at another batch size;
untrained default encoder (its near-tied scores make it the hardest case for rounding). Prints JSON:
how many ranks differ and by how much (also among the users shorter than the window).
``parts``: CPU seconds of each part of the ranking of the first N test users (gather, seen lists, event
embedding, encoder block 1, block 2 at the last event, scoring GEMM, rank count or the two tiled together,
popularity), and their sum extrapolated to all users, for each variant, one batch of each in turn;
``--full-forward`` times block 2 at every position as before the cut; ``--malloc`` picks glibc's settings.
``count``: CPU milliseconds per batch of 256 x 26,739 of the ways to count ``scores >= target`` per row.
``batch-sizes``: CPU seconds of the tiled ranking of the first N users at each batch size, interleaved.
``gemm``: CPU milliseconds per batch of the full scoring ``addmm`` against tiles of it (and ``rank_tiled``).
"""

from __future__ import annotations

import argparse
import contextlib
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
from userllm.ranking import SCORE_TILE, history_pairs, next_item_ranks, rank_in_place, rank_tiled  # noqa: E402


def release_setup(args):
    """(dataset, PretrainConfig, test NextItemEval, the untrained default AR encoder seeded 0 in eval mode)
    of the release at ``args.release``: what every check here ranks (the cost does not depend on the weights)."""
    ds = load_dataset("movielens", args.release, cache_dir=args.cache_dir)
    cfg = PretrainConfig(dataset="movielens", data_path=args.release)
    ev = next_item_eval(ds, cfg.window, "test")
    torch.manual_seed(0)
    return ds, cfg, ev, build_encoder(cfg.encoder, cfg.encoder_spec(ds)).eval()


def check_ranks(args) -> dict:
    ds, cfg, ev, enc = release_setup(args)
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

    def tiled_ranks(b):     # rank_tiled in the batches of old_ranks (unsorted)
        batch = collate(ds, ev.examples, b)
        seen = tuple(torch.from_numpy(a) for a in history_pairs(ev, b))
        return rank_tiled(*enc.next_item_query(batch.features, batch.lengths), batch.labels, seen)

    def run(f, bs):
        return torch.cat([f(idx[a:a + bs]) for a in range(0, len(idx), bs)])

    def compare(a, b):
        d = (a - b).abs()
        return {"differing": int((d > 0).sum()), "max_rank_diff": int(d.max())}

    with torch.inference_mode():
        o256, o100, t256 = run(old_ranks, 256), run(old_ranks, 100), run(tiled_ranks, 256)
        new = next_item_ranks(enc, ds, ev, idx, "cpu", True, None, batch_size=256)["encoder"]
    short = torch.from_numpy(ev.examples.target[idx] - ev.examples.start[idx] < cfg.window)
    return {"users": len(idx), "shorter_than_window": int(short.sum()), "old_vs_new": compare(o256, new),
            "old_vs_new_short_users": compare(o256[short], new[short]),
            "old_vs_tiled_unsorted": compare(o256, t256), "old_batch256_vs_batch100": compare(o256, o100)}


#: The ways ``parts`` can rank, each timed in the same run (one batch of each in turn): the batch order
#: (``sorted`` = users grouped by history length, as userllm.ranking does) and the scoring (``full``:
#: the [B, I] scores then rank_in_place; ``tiled``: rank_tiled).
VARIANTS = {"full": (False, False), "sorted": (True, False), "tiled": (False, True), "sorted_tiled": (True, True)}


def parts(args) -> dict:
    from userllm.encoders.pretraining import train_item_counts
    from userllm.ranking import PopularityRanks

    ds, _, ev, enc = release_setup(args)
    pop = PopularityRanks(train_item_counts(ds))
    n = min(args.users, len(ev))
    lengths = ev.examples.target[:n] - ev.examples.start[:n]
    orders = {False: np.arange(n), True: np.argsort(lengths, kind="stable")}
    variants = args.variants.split(",")
    spent: dict[str, dict[str, float]] = {v: {} for v in variants}
    clock = [time.process_time()]

    def tick(v: str, name: str) -> None:
        now = time.process_time()
        spent[v][name] = spent[v].get(name, 0.0) + now - clock[0]
        clock[0] = now

    def one(v: str, a: int) -> None:
        by_length, tiled = VARIANTS[v]
        b = orders[by_length][a:a + args.batch_size]
        clock[0] = time.process_time()
        batch = collate(ds, ev.examples, b)
        tick(v, "gather")
        seen = tuple(torch.from_numpy(x) for x in history_pairs(ev, b))
        tick(v, "seen_lists")
        x = enc.embed(batch.features)
        tick(v, "embedding")
        last = (batch.lengths.clamp(max=x.shape[1]) - 1).clamp_min(0)
        x = enc.transformer.blocks[0](x)
        tick(v, "block1")
        if args.full_forward:
            h = enc.transformer.ln_f(enc.transformer.blocks[1](x))[torch.arange(len(b)), last]
        else:
            h = enc.transformer.ln_f(enc.transformer.blocks[1].forward_last(x, last))
        tick(v, "block2")
        if tiled:
            q = enc.head_proj["item"](h)
            rank_tiled(q, enc.tables["item"], enc.head_bias["item"], batch.labels, seen, tile=args.tile)
            tick(v, "scoring_and_count")
        else:
            scores = enc.feature_logits(h, "item").float()
            tick(v, "scoring")
            rank_in_place(scores, batch.labels, seen)
            tick(v, "rank_count")
        pop.ranks(batch.labels, seen)
        tick(v, "popularity")

    from userllm.utils.memory import reuse_freed_memory, varying_shapes
    if args.malloc == "reuse":
        reuse_freed_memory()
    with torch.inference_mode(), (varying_shapes() if args.malloc == "varying" else contextlib.nullcontext()):
        for a in range(0, n, args.batch_size):
            for v in variants:
                one(v, a)
    out = {"users": n, "batch_size": args.batch_size, "tile": args.tile}
    for v in variants:
        total = sum(spent[v].values())
        out[v] = {**{k: round(t, 3) for k, t in spent[v].items()}, "total_cpu_s": round(total, 2),
                  "all_users_cpu_s": round(total * len(ev) / n, 1)}
    return out


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


def batch_sizes(args) -> dict:
    """CPU s of ranking the first N test users (sorted by history length, ``next_item_query`` +
    ``rank_tiled``, seen items filtered) at each batch size, one chunk of users at every size in turn."""
    ds, _, ev, enc = release_setup(args)
    n, sizes = min(args.users, len(ev)), [int(x) for x in args.sizes.split(",")]
    order = np.argsort(ev.examples.target[:n] - ev.examples.start[:n], kind="stable")
    spent = dict.fromkeys(sizes, 0.0)
    with torch.inference_mode():
        for a in range(0, n, max(sizes)):
            users = order[a:a + max(sizes)]
            for size in sizes:
                c = time.process_time()
                for j in range(0, len(users), size):
                    b = users[j:j + size]
                    batch = collate(ds, ev.examples, b)
                    seen = tuple(torch.from_numpy(x) for x in history_pairs(ev, b))
                    rank_tiled(*enc.next_item_query(batch.features, batch.lengths), batch.labels, seen)
                spent[size] += time.process_time() - c
    return {"users": n, **{f"batch_{k}_cpu_s": round(v, 2) for k, v in spent.items()},
            **{f"batch_{k}_all_users_cpu_s": round(v * len(ev) / n, 1) for k, v in spent.items()}}


def bench_gemm(rounds: int = 15) -> dict:
    """CPU ms per batch of 256 x 26,739 scores (D = 64): the full ``addmm`` (+ the in-place count), and
    ``rank_tiled``'s GEMM into a reused [256, tile] buffer (+ its count), medians of interleaved rounds."""
    B, D, I = 256, 64, 26_739
    g = torch.Generator().manual_seed(0)
    q, table, bias = torch.randn(B, D, generator=g), torch.randn(I, D, generator=g), torch.randn(I, generator=g)
    labels = torch.randint(1, I, (B,), generator=g)

    def tiles(t):
        buf = torch.empty(B, t)

        def f():
            for a in range(0, I, t):
                n = min(t, I - a)
                torch.addmm(bias[a:a + n], q, table[a:a + n].t(), out=buf[:, :n])
        return f

    ways = {"full_addmm": lambda: torch.addmm(bias, q, table.t()),
            "full_addmm_and_count": lambda: rank_in_place(torch.addmm(bias, q, table.t()), labels),
            **{f"tiles_{t}": tiles(t) for t in (512, 1024, 2048, 4096)},
            **{f"rank_tiled_{t}": (lambda t=t: rank_tiled(q, table, bias, labels, tile=t)) for t in (1024, 2048, 4096)}}
    spent = {k: [] for k in ways}
    for _ in range(rounds):
        for k, f in ways.items():
            c = time.process_time()
            f()
            spent[k].append(time.process_time() - c)
    return {k: round(float(np.median(v)) * 1e3, 2) for k, v in spent.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("ranks")
    r.add_argument("release")
    r.add_argument("--cache-dir", default=None)
    r.add_argument("--users", type=int, default=5120)
    sub.add_parser("count")
    sub.add_parser("gemm")
    bs = sub.add_parser("batch-sizes")
    bs.add_argument("release")
    bs.add_argument("--cache-dir", default=None)
    bs.add_argument("--users", type=int, default=10240)
    bs.add_argument("--sizes", default="64,128,256,512,1024")
    pa = sub.add_parser("parts")
    pa.add_argument("release")
    pa.add_argument("--cache-dir", default=None)
    pa.add_argument("--users", type=int, default=10240)
    pa.add_argument("--batch-size", type=int, default=256)
    pa.add_argument("--threads", type=int, default=1)
    pa.add_argument("--full-forward", action="store_true")
    pa.add_argument("--variants", default="full,sorted_tiled",
                    help=f"comma-separated, timed in turn batch by batch: {', '.join(VARIANTS)}")
    pa.add_argument("--tile", type=int, default=SCORE_TILE)
    pa.add_argument("--malloc", choices=("varying", "reuse", "default"), default="varying",
                    help="glibc's settings: varying_shapes (evaluate_next_item's), reuse_freed_memory or glibc's own")
    args = parser.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    run = {"ranks": check_ranks, "parts": parts, "batch-sizes": batch_sizes, "gemm": lambda _: bench_gemm(), "count": lambda _: bench_count()}
    print(json.dumps(run[args.what](args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
