import numpy as np
import pytest

from userllm.data.dataset import process_events
from userllm.data.examples import make_examples
from userllm.data.synthetic import SUMMARIES, SyntheticConfig, generate_synthetic
from userllm.errors import UserError

SMALL = SyntheticConfig(num_users=60, num_items=80, num_categories=6, min_events=10, max_events=25, seed=3)


@pytest.fixture(scope="module")
def default_table():
    return generate_synthetic()


def _same(a, b):
    cols = ("user", "item", "timestamp", "rating")
    return (all(np.array_equal(getattr(a, c), getattr(b, c), equal_nan=(c == "rating")) for c in cols)
            and list(a.summary) == list(b.summary) and list(a.text) == list(b.text)
            and a.items.titles == b.items.titles and a.items.categories == b.items.categories)


def test_deterministic_for_a_seed():
    assert _same(generate_synthetic(SMALL), generate_synthetic(SMALL))
    other = SyntheticConfig(**{**SMALL.__dict__, "seed": 4})
    assert not _same(generate_synthetic(SMALL), generate_synthetic(other))


def test_shape_and_reader_paths(default_table):
    ev = default_table
    cfg = SyntheticConfig()
    assert ev.num_users == cfg.num_users and ev.num_items == cfg.num_items
    per_user = np.bincount(ev.user, minlength=ev.num_users)
    assert per_user.min() >= cfg.min_events and per_user.max() <= cfg.max_events
    # rows are a time-ordered log, users interleave (the loader must sort by user)
    assert np.all(np.diff(ev.timestamp) >= 0) and np.any(np.diff(ev.user) < 0)
    # ties in timestamps within a user
    o = np.lexsort((np.arange(len(ev)), ev.timestamp, ev.user))
    same_user = ev.user[o][1:] == ev.user[o][:-1]
    assert np.sum(same_user & (np.diff(ev.timestamp[o]) == 0)) > 10
    # categories: multi-valued, and some empty
    ncat = np.array([len(c) for c in ev.items.categories])
    assert (ncat == 0).sum() == cfg.empty_category_items and (ncat > 1).sum() > 20 and ncat.max() <= 3
    # ratings: 1..5 with half stars, a few missing
    r = ev.rating
    ok = r[~np.isnan(r)]
    assert ok.min() >= 1 and ok.max() <= 5 and np.any(ok != np.round(ok))
    assert 0 < np.isnan(r).sum() < 0.01 * len(r)
    # titles unique, movie-like; summaries everywhere, a few texts missing
    assert len(set(ev.items.titles)) == ev.num_items
    assert all(t.startswith("The ") and t.endswith(")") for t in ev.items.titles)
    assert all(isinstance(s, str) and s for s in ev.summary)
    assert 0 < sum(t is None for t in ev.text) < 0.05 * len(ev)


def test_reviews_follow_rating_and_category(default_table):
    ev = default_table
    for row in range(0, len(ev), 97):
        cats = ev.items.categories[ev.item[row]]
        word = cats[0].lower() if cats else "film"
        assert word in ev.summary[row]
        if not np.isnan(ev.rating[row]):  # the summary's sentiment is the rating's
            bucket = int(np.clip(np.rint(ev.rating[row]), 1, 5))
            assert ev.summary[row] in [t.format(cat=word) for t in SUMMARIES[bucket]]
        if ev.text[row] is not None:
            assert ev.text[row].startswith(ev.summary[row])


def test_next_item_learnable_bigram_beats_popularity(default_table):
    """A numpy bigram (previous item -> next item) model beats popularity clearly on Recall@10."""
    ds = process_events(default_table)
    train = make_examples(ds, "nextitem", 1, "train")
    test = make_examples(ds, "nextitem", 1, "test")
    item = ds.features["item"]
    V = ds.num_items
    pop = np.bincount(item[train.target], minlength=V).astype(float)
    bigram = np.zeros((V, V))
    np.add.at(bigram, (item[train.target - 1], item[train.target]), 1.0)

    def recall10(scores):
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        return float((top == test.labels[:, None]).any(axis=1).mean())

    r_pop = recall10(np.broadcast_to(pop, (len(test), V)))
    r_bigram = recall10(bigram[item[test.target - 1]] + 1e-3 * pop)
    assert r_bigram >= 0.2 and r_bigram >= 3 * r_pop, (r_bigram, r_pop)


def test_ratings_correlate_with_preference(default_table):
    """Users rate the categories they consume most higher than the others."""
    ev = default_table
    hi, lo = [], []
    for u in range(0, ev.num_users, 3):
        rows = np.flatnonzero(ev.user == u)
        first = [ev.items.categories[i][0] if ev.items.categories[i] else None for i in ev.item[rows]]
        names, counts = np.unique([c for c in first if c], return_counts=True)
        fav = names[counts.argmax()]
        for r, c in zip(ev.rating[rows], first):
            if not np.isnan(r) and c:
                (hi if c == fav else lo).append(r)
    assert np.mean(hi) > np.mean(lo) + 0.5


def test_config_validation():
    with pytest.raises(UserError):
        generate_synthetic(SyntheticConfig(min_events=10, max_events=5))
    with pytest.raises(UserError):
        generate_synthetic(SyntheticConfig(max_series_length=11))
    with pytest.raises(UserError):
        generate_synthetic(SyntheticConfig(tie_prob=1.5))
