"""Device-side full ranking (userllm.ranking) against the reference protocol (metrics.label_ranks)."""

import numpy as np
import pytest
import torch

from userllm.data.dataset import process_events
from userllm.data.examples import collate, next_item_eval
from userllm.data.synthetic import SyntheticConfig, generate_synthetic
from userllm.metrics import label_ranks, metrics_from_ranks, popularity_scores
from userllm.ranking import PopularityRanks, evaluate_next_item, history_pairs, rank_in_place


@pytest.fixture(scope="module")
def ds():
    cfg = SyntheticConfig(num_users=70, num_items=50, num_categories=4, min_events=5, max_events=40, seed=11)
    return process_events(generate_synthetic(cfg))


class Scorer(torch.nn.Module):
    """score_next with many exact ties (scores rounded to a coarse grid), so the tie rule is exercised."""

    def __init__(self, num_items: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(num_items, 4, generator=torch.Generator().manual_seed(0)))

    def score_next(self, features, lengths):
        items = features[0].clamp_min(0)
        h = self.table[items].sum(1) / lengths[:, None]
        return torch.round((h @ self.table.T) * 2) / 2


def reference(encoder, ds, evalset, idx, filter_seen, popularity, batch_size):
    """The implementation this module replaced (pretrain.evaluate before issue #10), verbatim in effect."""
    labels_all = evalset.examples.labels
    idx = idx[labels_all[idx] > 0]
    ranks = {"encoder": [], "popularity": []}
    for a in range(0, len(idx), batch_size):
        b = idx[a:a + batch_size]
        batch = collate(ds, evalset.examples, b)
        seen = evalset.seen_mask(b, ds.num_items, keep_target=True) if filter_seen else None
        scores = encoder.score_next(batch.features, batch.lengths)
        ranks["encoder"].append(label_ranks(scores.float().cpu(), batch.labels, seen))
        pop = popularity[None].expand(len(b), -1)
        ranks["popularity"].append(label_ranks(pop, batch.labels, seen))
    return ranks


@pytest.mark.parametrize("filter_seen", [False, True])
@pytest.mark.parametrize("split", ["val", "test"])
def test_same_ranks_and_metrics_as_the_dense_reference(ds, filter_seen, split):
    evalset = next_item_eval(ds, 10, split)
    enc = Scorer(ds.num_items)
    pop = popularity_scores(ds.features["item"], ds.num_items)
    pop[5] = pop[6]                                         # a popularity tie
    idx = np.arange(len(evalset))[::-1].copy()              # any order, not only 0..n-1
    want = reference(enc, ds, evalset, idx, filter_seen, pop, batch_size=16)
    got = evaluate_next_item(enc, ds, evalset, idx, "cpu", filter_seen, pop, batch_size=16)
    for k in ("encoder", "popularity"):
        assert got[k] == metrics_from_ranks(torch.cat(want[k]))
    # and rank by rank, batch by batch
    labels = evalset.examples.labels
    keep = idx[labels[idx] > 0]
    b = keep[:16]
    batch = collate(ds, evalset.examples, b)
    row, item = history_pairs(evalset, b)
    seen = (torch.from_numpy(row), torch.from_numpy(item)) if filter_seen else None
    assert torch.equal(rank_in_place(enc.score_next(batch.features, batch.lengths), batch.labels, seen),
                       want["encoder"][0])
    assert torch.equal(PopularityRanks(pop).ranks(batch.labels, seen), want["popularity"][0])


def test_rank_in_place_matches_label_ranks_with_ties_and_repeats():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (9, 12), generator=g).float()
    labels = torch.randint(1, 12, (9,), generator=g)
    history = torch.randint(-1, 12, (9, 7), generator=g)     # repeats, padding, UNK and the label itself
    history[0, 0] = labels[0]
    mask = torch.zeros(9, 12, dtype=torch.bool)
    valid = history >= 0
    rows = torch.arange(9)[:, None].expand_as(history)
    mask[rows[valid], history[valid]] = True
    want = label_ranks(scores, labels, mask)
    got = rank_in_place(scores.clone(), labels, (rows[valid], history[valid]))
    assert torch.equal(got, want)
    pop = scores[0].clone()
    assert torch.equal(PopularityRanks(pop).ranks(labels, (rows[valid], history[valid])),
                       label_ranks(pop[None].expand(9, -1), labels, mask))
    assert torch.equal(PopularityRanks(pop).ranks(labels), label_ranks(pop[None].expand(9, -1), labels))


def test_no_examples_no_metrics(ds):
    evalset = next_item_eval(ds, 10, "test")
    assert evaluate_next_item(Scorer(ds.num_items), ds, evalset, np.zeros(0, np.int64), "cpu", True) == {}
