"""The multi-seed aggregate of the exploration evaluation (mean ± std, the table, the curve) and the target
check, on hand-made per-seed results (no model: milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from userllm.explore import evaluate as ev


def result(hit, pos, distinct, entropy, passes=0.0):
    return {"hit": hit, "pos_among_hits": pos, "item_recall@10": hit / 2, "distinct": distinct, "entropy": entropy,
            "passes": passes, "tokens": 10 * passes, "ms": passes, "users": 100}


def seed_results(hits, pos, distinct, entropy):
    """{method: metrics} of one seed: the baselines constant, best-of-n from the lists (n = 1, 2, 4)."""
    out = {m: result(0.1, 0.5, 10, 3.0) for m in ev.BASELINES}
    for n, h, p, d, e in zip((1, 2, 4), hits, pos, distinct, entropy):
        out[ev.best_of_n_name(n)] = result(h, p, d, e, passes=float(n))
    return out


SEEDS = [seed_results([0.10, 0.14, 0.20], [0.80, 0.90, None], [20, 19, 12], [4.0, 3.9, 3.0]),
         seed_results([0.12, 0.16, 0.22], [0.70, 0.80, 0.95], [18, 17, 10], [3.8, 3.6, 2.8]),
         seed_results([0.14, 0.15, 0.18], [0.75, 0.85, 0.90], [22, 21, 14], [4.2, 4.0, 3.2])]


def test_aggregate_is_the_mean_and_sample_std_over_seeds_in_method_order():
    agg = ev.aggregate(SEEDS)
    assert list(agg) == [*ev.BASELINES, "best-of-1", "best-of-2", "best-of-4"]
    hit = agg["best-of-1"]["hit"]
    assert hit["values"] == [0.10, 0.12, 0.14]
    assert hit["mean"] == pytest.approx(0.12) and hit["std"] == pytest.approx(np.std([0.10, 0.12, 0.14], ddof=1))
    # A seed without a hit has no positive rate among hits: left out of the mean, not counted as 0.
    pos = agg["best-of-4"]["pos_among_hits"]
    assert pos["values"] == [0.95, 0.90] and pos["mean"] == pytest.approx(0.925)
    assert agg["random"]["hit"]["std"] == pytest.approx(0.0, abs=1e-12)
    one = ev.aggregate(SEEDS[:1])
    assert one["best-of-2"]["hit"]["std"] == 0.0 and one["best-of-2"]["hit"]["mean"] == 0.14


def test_table_shows_mean_and_std_and_curve_is_a_png(tmp_path):
    agg = ev.aggregate(SEEDS)
    table = ev.format_table(agg, "title")
    row = next(line for line in table.splitlines() if line.startswith("| best-of-1 |"))
    assert "0.120 ± 0.020" in row and "20.0 ± 2.0" in row
    single = ev.format_table(ev.aggregate(SEEDS[:1]), "one seed")
    assert "±" not in single
    ev.plot_curve(agg, [1, 2, 4], tmp_path / "curve.png", "title")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_needs_a_gain_and_diversity_within_ten_percent():
    mean = {m: {k: v["mean"] for k, v in r.items()} for m, r in ev.aggregate(SEEDS).items()}
    # n = 2: hit 0.150 > 0.120, distinct 19 >= 0.9 * 20, entropy 3.83 >= 0.9 * 4.0 -> met; n = 4 loses diversity.
    assert ev.target_met(mean, [1, 2, 4]) == {"met": True, "n": [2]}
    mean["best-of-2"]["distinct"] = 17.9                    # -10.5%: the previous session's miss
    assert ev.target_met(mean, [1, 2, 4]) == {"met": False, "n": []}
    mean["best-of-2"]["distinct"] = 19.0
    assert ev.target_met(mean, [1, 2, 4], max_n=1)["met"] is False     # only n <= max_n counts


def test_cluster_bias_share_separates_a_global_ranking_from_a_per_user_one():
    from userllm.explore.concentration import cluster_bias_share, concentration

    rng = np.random.default_rng(0)
    bias = rng.normal(size=8)
    # Every user ranks the clusters by the same bias (plus its own offset): fully user-independent.
    same = [{c: float(bias[c] + u) for c in rng.choice(8, 5, replace=False)} for u in range(50)]
    assert cluster_bias_share(same) == pytest.approx(1.0)
    # Independent scores per user: the cluster means explain little.
    own = [{c: float(rng.normal()) for c in rng.choice(8, 5, replace=False)} for _ in range(400)]
    assert cluster_bias_share(own) < 0.05
    records = [{"picks": {"popular": 0, "aligned-all": 1, "best-of-2": 1}, "samples": {"2": [1, 1]},
                "aligned_all": {"0": 0.0, "1": 1.0}},
               {"picks": {"popular": 0, "aligned-all": 1, "best-of-2": 0}, "samples": {"2": [0, 2]},
                "aligned_all": {"0": 0.0, "1": 1.0, "2": -1.0}}]
    conc = concentration(records)
    assert conc["methods"]["best-of-2"] == {"popular_share": 0.5, "aligned_top_share": 0.5, "candidates": 1.5}
    assert conc["score_range"] == pytest.approx(1.5)                    # median of the spreads 1 and 2


def test_target_pools_hits_over_seeds():
    # The same hits over all seeds is a tie, whatever the seeds' user counts; one more hit is a gain.
    def res(hit, users, pos=0.8):
        return {"hit": hit / users, "pos_among_hits": pos, "distinct": 20, "entropy": 4.0, "users": users}
    seeds = [{"best-of-1": res(14, 100), "best-of-2": res(14, 100)},
             {"best-of-1": res(9, 60), "best-of-2": res(9, 60)}]
    assert ev.pooled(seeds)["best-of-2"]["hit"] == 23 / 160
    assert ev.target_met(ev.pooled(seeds), [1, 2])["met"] is False
    seeds[1]["best-of-2"] = res(10, 60)
    assert ev.target_met(ev.pooled(seeds), [1, 2]) == {"met": True, "n": [2]}
