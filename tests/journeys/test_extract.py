"""Extraction: clustering by cosine distance (both rules), the persistence filter, ordering, salience,
and the quality measures against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from userllm.journeys.config import JourneysConfig
from userllm.journeys.extract import (cluster_events, genre_vectors, journey_quality, mean_pairwise_cosine,
                                      user_journeys)

DAY = 86400


def _two_groups(rng, n_a=7, n_b=4, d=16):
    a, b = rng.normal(size=d), rng.normal(size=d)
    x = np.stack([a + 0.05 * rng.normal(size=d) for _ in range(n_a)] + [b + 0.05 * rng.normal(size=d)
                                                                        for _ in range(n_b)])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["agglomerative", "online"])
def test_cluster_events_finds_the_groups(method):
    x = _two_groups(np.random.default_rng(0))
    order = np.random.default_rng(1).permutation(len(x))        # interleave the groups in time
    labels = cluster_events(x[order], method, threshold=0.3)
    truth = (order >= 7).astype(int)
    assert len(set(labels)) == 2
    assert all(len(set(labels[truth == g])) == 1 for g in (0, 1))
    assert len(cluster_events(x[:1], method, 0.3)) == 1
    # A threshold above every distance merges everything; 0 splits every distinct vector.
    assert len(set(cluster_events(x, method, 2.0))) == 1
    assert len(set(cluster_events(x, "agglomerative", 0.0))) == len(x)


def test_user_journeys_persistence_order_and_salience(tiny_ds):
    ds = tiny_ds
    vec = genre_vectors(ds)                                     # items 10 / 20 / 30: orthogonal genres
    cfg = JourneysConfig(method="none", pretrain_steps=1, min_events=3, min_days=14, distance_threshold=0.5)
    u1 = user_journeys(ds, 0, vec, cfg)
    assert [j.size for j in u1.journeys] == [3, 3]
    # Same size: the more recent journey (item 20, last event day 30) comes first.
    first, second = u1.journeys
    assert ds.item_titles(ds.features["item"][first.rows])[0] == "Heat (1995)"
    assert (first.start, first.end) == (5 * DAY, 30 * DAY) and first.span_days == 25
    assert first.salience == pytest.approx(0.5 * 25 / 30) and second.salience == pytest.approx(0.5 * 20 / 30)
    assert sorted(u1.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # User 2's events lie within one hour: no persistent journey, every event transient.
    u2 = user_journeys(ds, 1, vec, cfg)
    assert u2.journeys == [] and (u2.labels == -1).all()
    # min_events filters too; max_journeys keeps the first ones.
    assert user_journeys(ds, 0, vec, JourneysConfig(method="none", min_events=4)).journeys == []
    assert len(user_journeys(ds, 0, vec, JourneysConfig(method="none", min_events=3, max_journeys=1,
                                                       distance_threshold=0.5)).journeys) == 1


def test_mean_pairwise_cosine_matches_brute_force():
    x = _two_groups(np.random.default_rng(2))
    x[3] = 0.0                                                  # an item without any genre
    n = len(x)
    brute = np.mean([x[i] @ x[j] for i in range(n) for j in range(n) if i != j])
    assert mean_pairwise_cosine(x) == pytest.approx(brute, rel=1e-6)


def test_quality_of_the_tiny_dataset(tiny_ds):
    ds = tiny_ds
    vec = genre_vectors(ds)
    cfg = JourneysConfig(method="none", min_events=3, min_days=14, distance_threshold=0.5)
    extracted = [user_journeys(ds, u, vec, cfg) for u in range(2)]
    q = journey_quality(ds, extracted, {"genre": vec})
    assert (q["users"], q["journeys"], q["users_without_journey"]) == (2, 2, 1)
    assert q["coherence"]["genre"] == pytest.approx(1.0)       # each journey repeats one movie
    assert q["random"]["genre"] < 1.0 and q["ratio"]["genre"] > 1.0
    assert q["coverage"] == pytest.approx(0.5)                  # user 1 fully covered, user 2 not at all
    assert q["mean_span_days"] == pytest.approx(22.5)
