"""Interest clusters, novel transitions and the feedback rule on hand-built sequences."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from userllm.explore.clusters import (FEEDBACK_RULES, build_clusters, cluster_labels, feedback, last_per_user,
                                      novel_transitions, recent_clusters, split_users)


def tiny_ds(sequences: list[list[int]], ratings: list[list[float]]):
    """A stand-in for a ProcessedDataset: per-user event rows, with the events' clusters given directly."""
    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rating = np.concatenate([np.asarray(r, dtype=np.float32) for r in ratings])
    return SimpleNamespace(num_users=len(sequences), offsets=offsets, events=SimpleNamespace(rating=rating))


def test_novel_transitions_need_a_full_window_and_follow_up():
    # user 0: clusters 0 0 1 0 2 2 3 ; user 1: 5 5 5 4
    seqs = [[0, 0, 1, 0, 2, 2, 3], [5, 5, 5, 4]]
    ratings = [[5, 5, 5, 5, 2, 5, 5], [5, 5, 5, 1]]
    ds = tiny_ds(seqs, ratings)
    ec = np.concatenate([np.array(s) for s in seqs])
    tr = novel_transitions(ds, ec, window=2, follow_up=1, rating_threshold=4.0, rule="either")
    # user 0: row 2 (1 not in {0,0}) has a full window and 4 events after it; row 3 (0 is in {0,1}) is not
    # novel; row 4 (2 not in {1,0}) is; row 6 has no follow-up event. User 1: row 3 of the user (global 10)
    # has no follow-up.
    assert tr.row.tolist() == [2, 4]
    assert tr.cluster.tolist() == [1, 2]
    assert tr.engaged.tolist() == [False, True]            # cluster 2 comes back at the next event
    assert tr.rated_well.tolist() == [True, False]
    assert tr.positive.tolist() == [True, True]
    both = novel_transitions(ds, ec, 2, 1, 4.0, rule="both")
    assert both.positive.tolist() == [False, False]
    wide = novel_transitions(ds, ec, window=3, follow_up=0, rating_threshold=4.0)
    assert wide.row.tolist() == [4, 6, 10]                 # no follow-up needed: the last events count too
    assert wide.user.tolist() == [0, 0, 1]


def test_window_never_looks_into_the_previous_user():
    seqs = [[0, 1, 2], [3, 3, 4, 4]]
    ds = tiny_ds(seqs, [[4] * 3, [4] * 4])
    ec = np.concatenate([np.array(s) for s in seqs])
    tr = novel_transitions(ds, ec, window=2, follow_up=1, rating_threshold=4.0)
    assert tr.row.tolist() == [5]                          # user 1's first 4: rows 3-4 (3, 3) before it
    assert tr.user.tolist() == [1]


def test_missing_rating_is_not_rated_well_and_rules_combine():
    rated = np.array([True, False, True, False])
    engaged = np.array([True, True, False, False])
    assert feedback(rated, engaged, "rating").tolist() == rated.tolist()
    assert feedback(rated, engaged, "engagement").tolist() == engaged.tolist()
    assert feedback(rated, engaged, "both").tolist() == [True, False, False, False]
    assert feedback(rated, engaged, "either").tolist() == [True, True, True, False]
    ds = tiny_ds([[0, 0, 1, 1]], [[4, 4, np.nan, 4]])
    tr = novel_transitions(ds, np.array([0, 0, 1, 1]), 2, 1, 4.0, rule="rating")
    assert tr.rated_well.tolist() == [False] and tr.engaged.tolist() == [True]
    with pytest.raises(ValueError, match="feedback rule"):
        feedback(rated, engaged, "sometimes")
    assert set(FEEDBACK_RULES) == {"rating", "engagement", "both", "either"}


def test_recent_clusters_last_occurrence_order_and_last_per_user():
    ec = np.array([3, 1, 3, 2, 1, -1])
    assert recent_clusters(ec, 5, 5) == [3, 2, 1]           # 3 last seen at 2, 2 at 3, 1 at 4; -1 skipped
    assert recent_clusters(ec, 3, 2) == [1, 3]
    tr = SimpleNamespace(user=np.array([0, 0, 2, 5, 5, 5]))
    assert last_per_user(tr).tolist() == [1, 2, 5]


def test_split_users_is_seeded_and_keeps_both_sides():
    a, b = split_users(100, 0.3, seed=1), split_users(100, 0.3, seed=1)
    assert a.tolist() == b.tolist() and a.sum() == 30
    assert split_users(100, 0.3, seed=2).tolist() != a.tolist()
    assert split_users(2, 0.99, seed=0).sum() == 1


def test_clusters_follow_the_embeddings_and_labels_name_distinct_categories():
    # 3 well separated groups of items; category 1 marks group 0, category 2 group 1, group 2 has both.
    rng = np.random.default_rng(0)
    centers = np.eye(3) * 10
    groups = np.repeat(np.arange(3), 6)
    emb = np.vstack([np.zeros((1, 3)), centers[groups] + rng.normal(0, 0.1, (18, 3))])
    cats = np.full((19, 2), -1)
    cats[1:7, 0] = 1
    cats[7:13, 0] = 2
    cats[13:19] = [1, 2]
    names = {1: "Horror", 2: "Comedy"}
    ds = SimpleNamespace(num_items=19, item_categories=cats, vocabs={"category": [None, "Horror", "Comedy"]},
                         features={"item": np.arange(1, 19).repeat(2)},
                         category_names=lambda ids: [names.get(int(i), "") for i in ids],
                         item_titles=lambda ids: [f"t{int(i)}" for i in ids])
    cl = build_clusters(ds, emb, 3, seed=0)
    assert cl.item_cluster[0] == -1
    for g in range(3):                                      # each group is exactly one cluster
        assert len(set(cl.item_cluster[1:][groups == g].tolist())) == 1
    assert sorted(cl.sizes.tolist()) == [6, 6, 6]
    assert len(set(cl.labels)) == 3
    by_group = [cl.labels[cl.item_cluster[1 + 6 * g]] for g in range(3)]
    assert by_group[0].startswith("Horror") and by_group[1].startswith("Comedy")
    # Two clusters with the same categories get their top title appended to stay distinct.
    same = cluster_labels(ds, np.array([-1] + [0] * 6 + [1] * 6 + [2] * 6), 3)
    assert len(set(same)) == 3
    with pytest.raises(ValueError, match="--clusters"):
        build_clusters(ds, emb, 40)


def test_labels_with_the_same_categories_in_another_order_are_disambiguated():
    # Cluster 0 leans Horror then Comedy, cluster 1 Comedy then Horror: both get their top title appended.
    cats = np.array([[-1, -1], [1, 2], [1, -1], [1, 2], [2, -1], [3, -1], [3, -1], [3, -1], [3, -1]])
    names = {1: "Horror", 2: "Comedy", 3: "Drama"}
    ds = SimpleNamespace(num_items=9, item_categories=cats, vocabs={"category": [None, "H", "C", "D"]},
                         features={"item": np.arange(1, 9)},
                         category_names=lambda ids: [names.get(int(i), "") for i in ids],
                         item_titles=lambda ids: [f"t{int(i)}" for i in ids])
    labels = cluster_labels(ds, np.array([-1, 0, 0, 1, 1, 2, 2, 2, 2]), 3)
    assert labels[0].startswith("Horror & Comedy: ") and labels[1].startswith("Comedy & Horror: ")
    assert labels[2] == "Drama"
