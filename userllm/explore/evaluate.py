"""Offline evaluation on the held-out users' last novel transition: best-of-n against the baselines.

For every held-out user the system sees the window before its last novel event and picks one cluster new
for the user (absent from that window). Methods:

* ``random``: a uniformly random new cluster; ``popular``: the new cluster that was most often the
  target of the training users' novel transitions;
* ``greedy``: the novelty LLM's constrained greedy decode (n = 1, temperature 0);
* ``aligned-all``: the aligned LLM scores every new cluster and the top one is picked (its cost is one
  forward pass per new cluster);
* ``best-of-n``: n labels sampled from the novelty LLM (``--temperature`` / ``--top-p``); the aligned LLM
  scores the distinct ones and one is picked by ``--selection`` (:mod:`.selection`; default the top one;
  n = 1: the sample itself, no scoring; ties keep the first sampled).

Then, hierarchically, the items inside the chosen cluster are ranked by the (pretrained) encoder's
next-item scores restricted to that cluster.

Metrics per method: ``hit`` (chosen cluster = the user's actual novel cluster), ``pos_among_hits`` (share
of the hits whose transition had positive feedback), ``item_recall@10`` (the actual item in the top 10 of
the chosen cluster; 0 on a miss), ``distinct`` (distinct clusters chosen over the users), ``entropy``
(bits, of the chosen clusters' distribution over users), and per user ``passes`` / ``tokens`` / ``ms``
(LLM forward passes, tokens fed, wall time; see :mod:`.models`).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from ..metrics import label_ranks, seed_stats
from .models import Contexts, Cost
from .selection import additive_fit, select, selection_rng

RECALL_K = 10
BASELINES = ("random", "popular", "greedy", "aligned-all")
#: picks.jsonl key: rank (0 = first) of the actual item among its own cluster's items under the encoder.
TARGET_RANK = "target_item_rank"
METRICS = ("hit", "pos_among_hits", "item_recall@10", "distinct", "entropy", "passes", "tokens", "ms")


def best_of_n_name(n: int) -> str:
    return f"best-of-{n}"


def entropy_bits(picks: Sequence[int]) -> float:
    """Entropy (bits) of the empirical distribution of ``picks``."""
    counts = np.array(list(Counter(picks).values()), dtype=np.float64)
    if not len(counts):
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def pick_metrics(picks: np.ndarray, target: np.ndarray, positive: np.ndarray, item_rank: np.ndarray,
                 cost: Cost) -> dict:
    """The metrics of one method; picks / target int64 [U], positive bool [U], item_rank int64 [U]
    (rank of the actual item among the chosen cluster's items; only read on hits)."""
    U = len(picks)
    hit = picks == target
    return {"hit": float(hit.mean()) if U else 0.0,
            "pos_among_hits": float(positive[hit].mean()) if hit.any() else None,
            f"item_recall@{RECALL_K}": float((hit & (item_rank < RECALL_K)).mean()) if U else 0.0,
            "distinct": int(len(set(picks.tolist()))), "entropy": entropy_bits(picks.tolist()),
            "passes": cost.passes / max(U, 1), "tokens": cost.tokens / max(U, 1),
            "ms": 1000.0 * cost.seconds / max(U, 1), "users": U}


def evaluate(ds, clusters, ctx: Contexts, target: np.ndarray, positive: np.ndarray, popular_counts: np.ndarray,
             novelty, aligned, encoder, n_list: Sequence[int], temperature: float, top_p: float,
             batch_size: int, seed: int, device, selection: str = "top", selection_temperature: float = 1.0
             ) -> tuple[dict[str, dict], list[dict]]:
    """({method: metrics}, per-user pick records) for the held-out contexts (module docstring); best-of-n
    chooses among its samples by the ``selection`` rule (:mod:`.selection`)."""
    U, K = len(ctx), clusters.k
    allowed = ctx.new_clusters(K)
    rng = np.random.default_rng([seed, 21])
    gen = torch.Generator().manual_seed(seed)
    picks: dict[str, np.ndarray] = {m: np.zeros(U, dtype=np.int64) for m in BASELINES}
    costs: dict[str, Cost] = {m: Cost() for m in BASELINES}
    records = [{"samples": {}, "sample_scores": {}, "aligned_all": None} for _ in range(U)]
    candidates: dict[int, list] = {n: [None] * U for n in n_list}     # per n and user: (distinct, scores)
    for n in n_list:
        picks[best_of_n_name(n)] = np.zeros(U, dtype=np.int64)
        costs[best_of_n_name(n)] = Cost()
    for a in range(0, U, batch_size):
        idx = np.arange(a, min(a + batch_size, U))
        sub, sub_allowed = ctx.take(idx), [allowed[i] for i in idx]
        for j, i in enumerate(idx):
            picks["random"][i] = rng.choice(sub_allowed[j])
            picks["popular"][i] = max(sub_allowed[j], key=lambda c: (popular_counts[c], -c))
        greedy, cost = novelty.sample(sub, sub_allowed, 1, 0.0, 1.0, gen)
        picks["greedy"][idx] = [g[0] for g in greedy]
        costs["greedy"] += cost
        scores, cost = aligned.score(sub, sub_allowed)
        costs["aligned-all"] += cost
        for j, i in enumerate(idx):
            picks["aligned-all"][i] = select(sub_allowed[j], scores[j], "top")
            records[i]["aligned_all"] = dict(zip(sub_allowed[j], scores[j]))
        for n in n_list:
            name = best_of_n_name(n)
            samples, cost = novelty.sample(sub, sub_allowed, n, temperature, top_p, gen)
            costs[name] += cost
            distinct = [list(dict.fromkeys(s)) for s in samples]
            if n > 1:
                cand_scores, cost = aligned.score(sub, distinct)
                costs[name] += cost
            else:
                cand_scores = [[0.0] for _ in distinct]
            for j, i in enumerate(idx):
                candidates[n][i] = (distinct[j], cand_scores[j])
                records[i]["samples"][n] = samples[j]
                # unrounded: within a user the aligned scores can differ by < 1e-5 (--aligned-negatives 0)
                records[i]["sample_scores"][n] = list(cand_scores[j]) if n > 1 else []
    # After every user is scored: the lift rule's prior is fitted on all of them (:mod:`.selection`).
    prior = additive_fit([r["aligned_all"] for r in records], K)[0] if selection == "lift" else None
    for n in n_list:
        sel_rng = selection_rng(seed, n)
        for i, (cands, cand_scores) in enumerate(candidates[n]):
            picks[best_of_n_name(n)][i] = select(cands, cand_scores, selection, prior, selection_temperature,
                                                 sel_rng)
    # The rank inside the target cluster too: on a hit it is the rank inside the chosen one, so a saved run
    # can be re-scored with another selection rule without the encoder (:mod:`.rescore`).
    ranks = item_ranks(ds, clusters, ctx, {**picks, TARGET_RANK: target}, encoder, device, batch_size)
    results = {m: pick_metrics(picks[m], target, positive, ranks[m], costs[m]) for m in picks}
    for i in range(U):
        records[i]["picks"] = {m: int(picks[m][i]) for m in picks}
        records[i][TARGET_RANK] = int(ranks[TARGET_RANK][i])
    return results, records


@torch.no_grad()
def item_ranks(ds, clusters, ctx: Contexts, picks: dict[str, np.ndarray], encoder, device, batch_size: int
               ) -> dict[str, np.ndarray]:
    """Per method, int64 [U]: rank of the actual item among the chosen cluster's items under the encoder's
    next-item scores (``label_ranks`` with every item outside the cluster excluded)."""
    from .models import window_features

    item = torch.from_numpy(ds.features["item"][ctx.row])
    item_cluster = torch.from_numpy(clusters.item_cluster)
    out = {m: np.zeros(len(ctx), dtype=np.int64) for m in picks}
    for a in range(0, len(ctx), batch_size):
        idx = np.arange(a, min(a + batch_size, len(ctx)))
        feats, lengths = window_features(ds, ctx.take(idx), device)
        scores = encoder.score_next(feats, lengths).cpu()                        # [B, V]
        for m, p in picks.items():
            outside = item_cluster[None, :] != torch.from_numpy(p[idx])[:, None]  # [B, V]
            out[m][idx] = label_ranks(scores, item[idx], seen=outside).numpy()
    return out


def target_met(results: dict[str, dict], n_list: Sequence[int], max_n: int = 16, tolerance: float = 0.1
               ) -> dict:
    """Does best-of-n (n in 2..max_n) beat n = 1 on hit rate or positive-feedback rate among hits while its
    distinct-cluster count and entropy stay within ``tolerance`` of n = 1's? Returns the qualifying n."""
    base = results.get(best_of_n_name(1))
    if base is None:
        return {"met": False, "why": "n = 1 was not evaluated", "n": []}
    good = []
    for n in n_list:
        r = results[best_of_n_name(n)]
        if n == 1 or n > max_n:
            continue
        better = r["hit"] > base["hit"] or (r["pos_among_hits"] or 0) > (base["pos_among_hits"] or 0)
        diverse = (r["distinct"] >= (1 - tolerance) * base["distinct"]
                   and r["entropy"] >= (1 - tolerance) * base["entropy"])
        if better and diverse:
            good.append(n)
    return {"met": bool(good), "n": good}


def describe_target(target: dict) -> str:
    """The one-line verdict of :func:`target_met`'s result, as the run and the re-scoring print it."""
    return f"met at n = {', '.join(map(str, target['n']))}" if target["met"] else "not met"


def pooled(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """{method: {"hit", "pos_among_hits", "distinct", "entropy", "users"}} over seeds for :func:`target_met`.

    Hits and positive hits are counted over every (seed, user) pair, not averaged per seed: seeds hold
    different numbers of users, and a mean of per-seed rates let two methods with the same hits over all
    seeds differ (77 of 519 for both best-of-1 and best-of-2 on ml-latest-small read as a gain at n = 2).
    Diversity is a per-seed quantity (distinct clusters among one seed's users), so it is averaged.
    """
    out: dict[str, dict] = {}
    for m in per_seed[0]:
        rows = [r[m] for r in per_seed]
        users = sum(r["users"] for r in rows)
        hits = [round(r["hit"] * r["users"]) for r in rows]
        positive = sum(round((r["pos_among_hits"] or 0.0) * h) for r, h in zip(rows, hits))
        out[m] = {"hit": sum(hits) / max(users, 1), "pos_among_hits": positive / sum(hits) if sum(hits) else None,
                  "distinct": float(np.mean([r["distinct"] for r in rows])),
                  "entropy": float(np.mean([r["entropy"] for r in rows])), "users": users}
    return out


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """{method: {metric: {"mean", "std", "values"}}} over seeds (None values are left out of the mean)."""
    out: dict[str, dict] = {}
    order = lambda m: (0, BASELINES.index(m)) if m in BASELINES else (1, int(m.rsplit("-", 1)[1]))  # noqa: E731
    for m in sorted(per_seed[0], key=order):    # baselines, then best-of-n by n (a reloaded result is sorted)
        out[m] = {}
        for k in (*METRICS, "users"):
            out[m][k] = seed_stats([r[m][k] for r in per_seed if r[m].get(k) is not None])
    return out


def format_table(agg: dict[str, dict], title: str) -> str:
    """Markdown table: one row per method, mean (± std over seeds when there are several)."""
    cols = ("hit", "pos_among_hits", f"item_recall@{RECALL_K}", "distinct", "entropy", "passes", "tokens", "ms")
    heads = ("hit rate", "pos. among hits", f"item R@{RECALL_K}", "distinct", "entropy (bits)",
             "LLM passes/user", "tokens/user", "ms/user")
    lines = [title, "", "| method | " + " | ".join(heads) + " |", "| --- |" + " --- |" * len(cols)]
    for m, r in agg.items():
        cells = []
        for c in cols:
            v = r[c]
            if v["mean"] is None:
                cells.append("-")
                continue
            digits = 1 if c in ("distinct", "passes", "tokens", "ms") else 3
            s = f"{v['mean']:.{digits}f}"
            if len(v["values"]) > 1:
                s += f" ± {v['std']:.{digits}f}"
            cells.append(s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(agg: dict[str, dict], n_list: Sequence[int], path, title: str) -> None:
    """curve.png: best-of-n metrics against n (mean ± std over seeds), baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("hit", "hit rate of the chosen cluster"), ("pos_among_hits", "positive feedback among hits"),
              (f"item_recall@{RECALL_K}", f"item Recall@{RECALL_K} inside the chosen cluster"),
              ("entropy", "diversity: entropy of chosen clusters (bits)"),
              ("distinct", "diversity: distinct chosen clusters"), ("tokens", "cost: LLM tokens per user"))
    styles = {"random": ("tab:gray", ":"), "popular": ("tab:brown", "-."), "greedy": ("tab:green", "--"),
              "aligned-all": ("tab:red", "--")}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (key, label) in zip(axes.ravel(), panels):
        ys = [agg[best_of_n_name(n)][key] for n in n_list]
        mean = np.array([y["mean"] if y["mean"] is not None else np.nan for y in ys])
        std = np.array([y["std"] if y["std"] is not None else 0.0 for y in ys])
        ax.errorbar(n_list, mean, yerr=std, marker="o", color="tab:blue", capsize=3,
                    label="best-of-n (novelty samples, aligned selects)")
        for m, (color, ls) in styles.items():
            v = agg[m][key]["mean"]
            if v is not None and not (key == "tokens" and m in ("random", "popular")):
                ax.axhline(v, color=color, linestyle=ls, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(n_list))
        ax.set_xticklabels([str(n) for n in n_list])
        ax.set_xlabel("n (samples from the novelty LLM)")
        ax.set_title(label, fontsize=11)
        ax.grid(alpha=0.3)
        if key == "tokens":
            ax.set_yscale("log")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=10, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)

