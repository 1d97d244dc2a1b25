"""Device-side full ranking (userllm.ranking) against the reference protocol (metrics.label_ranks)."""

import numpy as np
import pytest
import torch

from userllm.data.dataset import process_events
from userllm.data.examples import collate, next_item_eval
from userllm.data.synthetic import SyntheticConfig, generate_synthetic
from userllm.metrics import label_ranks, metrics_from_ranks, popularity_scores
from userllm.ranking import (PopularityRanks, evaluate_next_item, history_pairs, next_item_ranks, rank_in_place,
                             rank_tiled)


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


def _integer_factors(B, I, D=3, seed=2):
    """query [B, D], table [I, D], bias [I] of small integers: exact products, many tied scores."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-2, 3, (B, D), generator=g).float(), torch.randint(-2, 3, (I, D), generator=g).float(),
            torch.randint(0, 2, (I,), generator=g).float())


@pytest.mark.parametrize("tile", [1, 4, 5, 12, 64])
def test_rank_tiled_equals_rank_in_place_on_the_full_scores(tile):
    B, I = 9, 12
    query, table, bias = _integer_factors(B, I)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(1, I, (B,), generator=g)
    history = torch.randint(0, I, (B, 7), generator=g)     # repeats, UNK and the label itself
    history[0, 0] = labels[0]
    rows = torch.arange(B)[:, None].expand_as(history).reshape(-1)
    seen = (rows, history.reshape(-1))
    scores = torch.addmm(bias, query, table.t())
    assert torch.equal(rank_tiled(query, table, bias, labels, seen, tile=tile),
                       rank_in_place(scores.clone(), labels, seen))
    assert torch.equal(rank_tiled(query, table, bias, labels, None, tile=tile),
                       rank_in_place(scores.clone(), labels))


def test_rank_tiled_one_row_and_nan_rows_fall_back_to_the_full_scores():
    query, table, bias = _integer_factors(4, 10)
    labels = torch.tensor([3, 1, 9, 5])
    query[2] = float("nan")                                 # NaN target: no candidate counts (rank 0)
    want = rank_in_place(torch.addmm(bias, query, table.t()), labels)
    assert want[2] == 0
    assert torch.equal(rank_tiled(query, table, bias, labels, tile=3), want)
    assert torch.equal(rank_tiled(query[:1], table, bias, labels[:1], tile=3), want[:1])


def test_ar_encoder_ranks_tiled_and_by_length_in_the_order_of_idx(ds):
    """The AR encoder's path (rank_tiled, batches sorted by history length) against the dense reference,
    rank by rank, for a shuffled idx."""
    from userllm.encoders import EncoderConfig, build_encoder

    torch.manual_seed(0)
    cfg = EncoderConfig(list(ds.feature_specs), d_model=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16)
    enc = build_encoder("ar", cfg).eval()
    assert hasattr(enc, "next_item_query")
    evalset = next_item_eval(ds, 10, "test")
    idx = np.random.default_rng(4).permutation(len(evalset))
    pop = popularity_scores(ds.features["item"], ds.num_items)
    want = reference(enc, ds, evalset, idx, True, pop, batch_size=16)
    got = next_item_ranks(enc, ds, evalset, idx, "cpu", True, pop, batch_size=16)
    lengths = evalset.examples.target - evalset.examples.start
    assert len(np.unique(lengths[idx])) > 3                 # several lengths, so sorting changes the batches
    for k in ("encoder", "popularity"):
        assert torch.equal(got[k], torch.cat(want[k])), k
