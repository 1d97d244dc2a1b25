"""Why best-of-n loses diversity: how the aligned selector concentrates the picks, read from a seed's
``picks.jsonl`` (no model, no label: only the picks, the samples and the aligned LLM's scores).

Per best-of-n (and the baselines' picks for reference):

* ``popular_share``: share of users whose pick is the most popular new cluster (the ``popular``
  baseline's pick): the collapse onto popular clusters;
* ``aligned_top_share``: share whose pick is the aligned LLM's top cluster over *every* new cluster
  (the ``aligned-all`` pick): as n grows the candidates cover more clusters, and best-of-n tends to the
  aligned ranking of everything;
* ``candidates``: distinct sampled clusters per user (what the selector chooses from).

And per seed, ``cluster_bias_share``: the part of the aligned scores that does not depend on the user.
Fitting ``score[u, c] = a[u] + b[c]`` (a user offset plus one number per cluster), it is the share
of the scores' variance within users that ``b`` explains. 1.0 means the selector ranks the clusters the
same for every user; best-of-n then converges, as n grows, to the same few clusters for everyone.
And ``score_range``: the median over users of the spread (max - min) of the aligned scores over the
user's new clusters, in logits: how strongly the selector separates the candidates at all (0.01 says
its choice is close to arbitrary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..metrics import seed_stats
from .selection import additive_fit

PICKS_FILE = "picks.jsonl"


def read_picks(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def cluster_bias_share(scores: Sequence[dict]) -> float:
    """Share (0..1) of the aligned scores' variance within users that one number per cluster explains.

    scores: per user, {cluster id: aligned score} over its new clusters (users with one cluster add nothing):
    the ``share`` of the additive fit ``score[u, c] = a[u] + b[c]`` (:func:`.selection.additive_fit`).
    """
    return additive_fit(scores)[1]


def concentration(records: Sequence[dict]) -> dict:
    """{"cluster_bias_share": float, "score_range": float, "methods": {method: {"popular_share",
    "aligned_top_share", "candidates"}}} of one seed's pick records (``picks.jsonl`` lines)."""
    methods = {}
    for m in records[0]["picks"]:
        picks = np.array([r["picks"][m] for r in records])
        popular = np.array([r["picks"]["popular"] for r in records])
        top = np.array([r["picks"]["aligned-all"] for r in records])
        row = {"popular_share": float((picks == popular).mean()), "aligned_top_share": float((picks == top).mean())}
        if m.startswith("best-of-"):
            n = m.rsplit("-", 1)[1]
            row["candidates"] = float(np.mean([len(set(r["samples"][n])) for r in records]))
        methods[m] = row
    bias = cluster_bias_share([{int(c): s for c, s in r["aligned_all"].items()} for r in records])
    spread = float(np.median([np.ptp(list(r["aligned_all"].values())) for r in records]))
    return {"cluster_bias_share": bias, "score_range": spread, "methods": methods}


def aggregate_concentration(per_seed: Sequence[dict]) -> dict:
    """Mean and sample std over seeds of :func:`concentration`'s figures (same layout, each a
    {"mean", "std", "values"})."""
    out = {k: seed_stats([s[k] for s in per_seed]) for k in ("cluster_bias_share", "score_range")} | {"methods": {}}
    for m, row in per_seed[0]["methods"].items():
        out["methods"][m] = {k: seed_stats([s["methods"][m][k] for s in per_seed]) for k in row}
    return out


def format_concentration(agg: dict, title: str) -> str:
    """Markdown table of :func:`aggregate_concentration` (mean ± std over seeds when there are several)."""
    def cell(v, digits):
        s = f"{v['mean']:.{digits}f}"
        return s + f" ± {v['std']:.{digits}f}" if len(v["values"]) > 1 else s

    lines = [title, "", "| method | pick = most popular new cluster | pick = aligned top of all new | "
             "distinct candidates |", "| --- | --- | --- | --- |"]
    for m, row in agg["methods"].items():
        if m in ("popular", "aligned-all"):
            continue                                   # 1.0 by definition
        cand = cell(row["candidates"], 1) if "candidates" in row else "-"
        lines.append(f"| {m} | {cell(row['popular_share'], 3)} | {cell(row['aligned_top_share'], 3)} | {cand} |")
    lines += ["", f"User-independent share of the aligned scores' variance: {cell(agg['cluster_bias_share'], 3)}",
              f"Median spread of a user's aligned scores over its new clusters (logits): "
              f"{cell(agg['score_range'], 3)}"]
    return "\n".join(lines)
