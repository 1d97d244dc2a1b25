"""Ranking metrics on hand-computed examples, the popularity baseline, and the ROUGE wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from userllm.metrics import (label_ranks, metrics_from_ranks, ndcg_at_k, popularity_scores, rank_metrics,
                             recall_at_k, rouge, seen_mask, split_sentences)

# Column 0 is UNK: its high score must never count against a label.
SCORES = torch.tensor([[9.0, 1.0, 4.0, 3.0, 2.0],     # label 2: best real item -> rank 0
                       [9.0, 1.0, 4.0, 3.0, 2.0],     # label 4: items 2 and 3 beat it -> rank 2
                       [9.0, 1.0, 1.0, 1.0, 1.0]])    # label 1: ties count against it -> rank 3
LABELS = torch.tensor([2, 4, 1])


def test_ranks_exclude_unk_and_break_ties_pessimistically():
    assert label_ranks(SCORES, LABELS).tolist() == [0, 2, 3]


def test_rank_metrics_hand_computed():
    m = rank_metrics(SCORES, LABELS, ks=(1, 3, 5))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    assert m["count"] == 3


def test_filter_seen_masks_history_but_never_the_label():
    history = torch.tensor([[2, 3, -1], [2, -1, -1], [1, 2, 3]])    # row 0 saw its own label 2
    ranks = label_ranks(SCORES, LABELS, seen=history)
    assert ranks.tolist() == [0, 1, 1]
    as_mask = seen_mask(history, 5)
    assert as_mask.tolist()[1] == [False, False, True, False, False]
    assert label_ranks(SCORES, LABELS, seen=as_mask).tolist() == [0, 1, 1]


def test_recall_ndcg_from_ranks():
    ranks = torch.tensor([0, 9, 10, 4])
    assert recall_at_k(ranks, 10) == pytest.approx(0.75)
    assert recall_at_k(ranks, 5) == pytest.approx(0.5)
    assert recall_at_k(ranks, 1) == pytest.approx(0.25)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(11) + 1 / math.log2(6)) / 4)
    assert metrics_from_ranks(torch.tensor([], dtype=torch.long))["recall@10"] == 0.0


def test_label_validation():
    with pytest.raises(ValueError, match="real item ids"):
        label_ranks(SCORES, torch.tensor([0, 1, 2]))                   # UNK is never a label
    with pytest.raises(ValueError, match="labels"):
        label_ranks(SCORES, torch.tensor([1, 2]))


def test_popularity_scores():
    pop = popularity_scores(np.array([3, 3, 1, -1, 3, 2, 1]), 5)
    assert pop.tolist() == [0, 2, 1, 3, 0]
    assert label_ranks(pop[None].expand(2, 5), torch.tensor([3, 4])).tolist() == [0, 3]


def test_rouge():
    assert split_sentences("Great movie. Loved it!  Would watch again") == "Great movie.\nLoved it!\nWould watch again"
    same = rouge(["the cat sat on the mat."], ["the cat sat on the mat."])
    assert all(v == pytest.approx(1.0) for v in same.values())
    m = rouge(["the cat sat", "nothing in common"], ["the cat ran", "a dog barked"])
    assert m["rouge1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m["rouge2"] == pytest.approx((1 / 2 + 0.0) / 2)
    # rougeLsum is summary-level: sentence order does not matter, unlike rougeL over one long sequence.
    swapped = rouge(["birds fly south. fish swim deep."], ["fish swim deep. birds fly south."])
    assert swapped["rougeLsum"] == pytest.approx(1.0)
    assert swapped["rougeL"] < 1.0
    with pytest.raises(ValueError):
        rouge(["a"], [])
