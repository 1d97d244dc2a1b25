"""Best-of-n selection rules (top, lift over the per-cluster prior, softmax) and the additive fit behind the
prior, on hand-made scores (no model: milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from userllm.explore.selection import additive_fit, select, selection_rng


def test_additive_fit_recovers_the_per_cluster_part_up_to_a_constant():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), np.array([3.0, 1.0, 0.0, -2.0, 0.5])
    scores = [{c: a[u] + b[c] for c in rng.choice(5, 3, replace=False).tolist()} for u in range(30)]
    fit, share = additive_fit(scores, 5)
    assert share == pytest.approx(1.0)
    assert fit - fit.mean() == pytest.approx(b - b.mean(), abs=1e-6)
    # Scores that depend on the user only through its own ranking: the per-cluster part explains little.
    own = [{c: float(rng.normal()) for c in range(5)} for _ in range(200)]
    assert additive_fit(own, 5)[1] < 0.05
    # A cluster nobody has gets 0, and K may exceed the clusters seen.
    assert len(additive_fit(scores, 7)[0]) == 7 and additive_fit(scores, 7)[0][6] == 0.0


def test_top_and_lift_differ_exactly_by_the_prior():
    prior = np.array([0.0, 5.0, 0.0, 1.0])
    assert select([1, 2], [3.0, 1.0], "top") == 1
    assert select([1, 2], [3.0, 1.0], "lift", prior) == 2          # 3 - 5 < 1 - 0
    assert select([3, 1], [2.0, 2.0], "top") == 3                   # ties keep the first
    with pytest.raises(ValueError, match="prior"):
        select([1, 2], [3.0, 1.0], "lift")
    with pytest.raises(ValueError, match="selection rule"):
        select([1, 2], [3.0, 1.0], "best")


def test_softmax_draws_in_proportion_to_exp_score_over_t():
    rng = np.random.default_rng(0)
    draws = [select([7, 8], [np.log(3.0), 0.0], "softmax", temperature=1.0, rng=rng) for _ in range(4000)]
    assert np.mean(np.array(draws) == 7) == pytest.approx(0.75, abs=0.03)
    cold = [select([7, 8], [1.0, 0.0], "softmax", temperature=1e-3, rng=rng) for _ in range(50)]
    assert set(cold) == {7}                                         # T -> 0 is the top rule
    def draws_at(seed, n):
        rng = selection_rng(seed, n)
        return [select([1, 2, 3], [0.1, 0.2, 0.3], "softmax", rng=rng) for _ in range(20)]

    assert draws_at(4, 8) == draws_at(4, 8) != draws_at(4, 16)     # seeded by (seed, n)
