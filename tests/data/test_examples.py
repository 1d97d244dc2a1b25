import numpy as np
import pytest
import torch

from userllm.data.dataset import process_events
from userllm.data.events import EventTable, ItemCatalog
from userllm.data.examples import (PretrainWindows, collate, favorite_categories, iter_batches, make_examples,
                                   next_item_eval, pretraining_batches, split_targets)
from userllm.data.synthetic import SyntheticConfig, generate_synthetic
from userllm.errors import UserError

ITEMS = {  # raw id -> categories
    "A": ("x", "y"),
    "B": ("y",),
    "C": (),
    "D": ("z",),
}


def tiny(with_reviews=True):
    """User a: A B D D C A (t = 1..6), user b: B C A (t = 1..3), rows deliberately interleaved."""
    names = list(ITEMS)
    rows = [("a", "A", 1), ("b", "B", 1), ("a", "B", 2), ("a", "D", 3), ("b", "C", 2), ("a", "D", 4),
            ("a", "C", 5), ("b", "A", 3), ("a", "A", 6)]
    users = sorted({r[0] for r in rows})
    n = len(rows)
    return EventTable(
        user=np.array([users.index(r[0]) for r in rows]), item=np.array([names.index(r[1]) for r in rows]),
        timestamp=np.array([r[2] for r in rows]), rating=np.array([5, 4, 3, 2, 1, 5, 4, 3, 2], dtype=np.float32),
        user_ids=np.array(users),
        items=ItemCatalog(raw_ids=np.array(names), titles=[f"Movie {k}" for k in names],
                          categories=[ITEMS[k] for k in names]),
        summary=np.array([f"sum {r[0]}{r[2]}" for r in rows], dtype=object) if with_reviews else None,
        text=np.array([f"text {r[0]}{r[2]}" for r in rows], dtype=object) if with_reviews else None,
        name="tiny")


@pytest.fixture(scope="module")
def ds_tiny():
    return process_events(tiny(), min_user_events=3)


@pytest.fixture(scope="module")
def ds_syn():
    cfg = SyntheticConfig(num_users=80, num_items=120, num_categories=6, min_events=5, max_events=30, seed=7,
                          tie_prob=0.3, empty_category_items=10)
    return process_events(generate_synthetic(cfg))


def item_names(ds, ids):
    return ds.vocabs["item"].decode(ids)


def test_split_rows_and_windows(ds_tiny):
    # sorted rows: user a 0..5, user b 6..8
    assert ds_tiny.offsets.tolist() == [0, 6, 9]
    for split, targets in (("test", [5, 8]), ("val", [4, 7]), ("train", [1, 2, 3])):
        assert split_targets(ds_tiny, split)[1].tolist() == targets
    assert split_targets(ds_tiny, "train", stride=2)[1].tolist() == [1, 3]  # anchored at the newest
    ex = make_examples(ds_tiny, "nextitem", 2, "train")
    assert ex.user.tolist() == [0, 0, 0] and ex.start.tolist() == [0, 0, 1] and ex.lengths.tolist() == [1, 2, 2]
    assert item_names(ds_tiny, ex.labels) == ["B", "D", "D"]
    test = make_examples(ds_tiny, "nextitem", 2, "test")
    assert test.start.tolist() == [3, 6] and item_names(ds_tiny, test.labels) == ["A", "A"]
    val = make_examples(ds_tiny, "nextitem", 10, "val")
    assert val.start.tolist() == [0, 6] and item_names(ds_tiny, val.labels) == ["C", "C"]


def test_favorite_category_tie_breaks():
    cats = np.array([[1, 2], [3, -1], [2, -1], [3, -1], [-1, -1], [0, -1], [1, 2]])
    start = np.array([0, 0, 0, 4, 5, 1])
    end = np.array([4, 3, 1, 6, 7, 3])
    # [0,4): 2 and 3 tie at 2 -> 3 seen last; [0,3): 2; [0,1): 1, 2 on the same event -> lowest id;
    # [4,6): only padding/UNK -> -1; [5,7): UNK ignored, 1 vs 2 same event -> 1; [1,3): 2 is more recent
    assert favorite_categories(cats, start, end, 4).tolist() == [3, 2, 1, -1, 1, 2]
    # chunking does not change the answer
    assert favorite_categories(cats, start, end, 4, chunk_elems=1).tolist() == [3, 2, 1, -1, 1, 2]


def test_favgenre_labels_on_tiny(ds_tiny):
    cat = ds_tiny.vocabs["category"]
    ex = make_examples(ds_tiny, "favgenre", 3, "train")
    # windows of user a: [A] -> x,y tie on one event -> lower id; [A B] -> y; [A B D] -> y
    expect_first = min(cat.id("x"), cat.id("y"))
    assert ex.labels.tolist() == [expect_first, cat.id("y"), cat.id("y")]
    test = make_examples(ds_tiny, "favcat", 3, "test")  # alias
    # user a window rows 2..4 = D D C -> z; user b window B C -> y
    assert ds_tiny.category_names(test.labels) == ["z", "y"]
    val = make_examples(ds_tiny, "favgenre", 1, "val")  # user a: [D] -> z; user b: [B] -> y
    assert ds_tiny.category_names(val.labels) == ["z", "y"]
    # a window with no category at all is dropped: test windows of length 1 are [C] for both users
    assert len(make_examples(ds_tiny, "favgenre", 1, "test")) == 0


def test_reviewg_examples(ds_tiny):
    ex = make_examples(ds_tiny, "reviewg", 2, "test")
    assert ex.texts == ["sum a6", "sum b3"] and ex.labels.tolist() == [-1, -1]
    ex = make_examples(ds_tiny, "reviewg", 2, "test", text_field="text")
    assert ex.texts == ["text a6", "text b3"]
    b = collate(ds_tiny, ex, [0, 1])
    assert b.texts == ex.texts
    item, rating, category = b.target
    assert item_names(ds_tiny, item) == ["A", "A"]
    assert ds_tiny.vocabs["rating"].decode(rating) == ["2", "3"]
    assert ds_tiny.category_names(category) == [["x", "y"], ["x", "y"]]
    with pytest.raises(UserError, match="review"):
        make_examples(process_events(tiny(with_reviews=False), min_user_events=3), "reviewg", 2, "test")


def test_favgenre_needs_categories():
    t = tiny()
    t.items.categories = [()] * len(t.items)
    with pytest.raises(UserError, match="categories"):
        make_examples(process_events(t, min_user_events=3), "favgenre", 2, "test")


def test_bad_task_split_window(ds_tiny):
    with pytest.raises(UserError):
        make_examples(ds_tiny, "rating", 2, "test")
    with pytest.raises(UserError):
        make_examples(ds_tiny, "nextitem", 2, "dev")
    with pytest.raises(UserError):
        make_examples(ds_tiny, "nextitem", 0, "test")
    with pytest.raises(UserError):
        make_examples(ds_tiny, "nextitem", 2, "train", stride=0)


@pytest.mark.parametrize("window,stride", [(1, 1), (3, 1), (8, 2), (50, 3)])
def test_no_val_or_test_event_leaks_into_train(ds_syn, window, stride):
    """Property: no val/test target is a train target or inside any train window, for every user."""
    assert np.sum(np.diff(ds_syn.events.timestamp) == 0) > 20  # the data has timestamp ties
    held = np.concatenate([split_targets(ds_syn, s)[1] for s in ("val", "test")])
    train = make_examples(ds_syn, "nextitem", window, "train", stride)
    assert not np.isin(train.target, held).any()
    covered = np.zeros(ds_syn.num_events, dtype=bool)
    lens = train.lengths
    rows = np.repeat(train.start, lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    covered[rows] = True
    assert not covered[held].any()
    # windows stay inside their user, are non-empty and at most `window` long
    o = ds_syn.offsets
    assert np.all(train.start >= o[train.user]) and np.all(train.target < o[train.user + 1])
    assert lens.min() >= 1 and lens.max() <= window
    # each user: one val and one test example; val window excludes the test event
    for split in ("val", "test"):
        ex = make_examples(ds_syn, "nextitem", window, split)
        assert ex.user.tolist() == list(range(ds_syn.num_users))
    val = make_examples(ds_syn, "nextitem", window, "val")
    assert np.all(val.target == o[1:] - 2)
    if stride == 1:  # every non-held-out event with a predecessor is a train target exactly once
        assert len(train) == ds_syn.num_events - 3 * ds_syn.num_users
        assert len(np.unique(train.target)) == len(train)


def test_collate_shapes_and_padding(ds_syn):
    ex = make_examples(ds_syn, "nextitem", 6, "train")
    idx = np.array([0, 5, 17, len(ex) - 1])
    b = collate(ds_syn, ex, idx)
    B, L = len(idx), int(ex.lengths[idx].max())
    K = ds_syn.features["category"].shape[1]
    assert [tuple(f.shape) for f in b.features] == [(B, L), (B, L), (B, L, K)]
    assert all(f.dtype == torch.int64 for f in b.features + b.target + [b.lengths, b.labels, b.rows])
    assert b.lengths.tolist() == ex.lengths[idx].tolist()
    for j, i in enumerate(idx):
        n, s = int(ex.lengths[i]), int(ex.start[i])
        for f, spec in zip(b.features, ds_syn.feature_specs):
            assert np.array_equal(f[j, :n].numpy(), ds_syn.features[spec.name][s:s + n])
            assert (f[j, n:] == -1).all()
    assert b.rows.tolist() == ex.target[idx].tolist() and b.labels.tolist() == ex.labels[idx].tolist()
    assert b.target[0].tolist() == ex.labels[idx].tolist() and tuple(b.target[2].shape) == (B, K)
    # an event whose item has no category is a row of -1 inside the real length
    empty_rows = np.flatnonzero((np.asarray(ds_syn.features["category"]) < 0).all(axis=1))
    assert len(empty_rows)
    hit = np.flatnonzero(np.isin(ex.target - 1, empty_rows))[0]  # an example whose last input is one
    b = collate(ds_syn, ex, [hit])
    n = int(b.lengths[0])
    assert (b.features[2][0, n - 1] == -1).all() and (b.features[0][0, :n] >= 0).all()
    # batches cover the examples once
    seen = torch.cat([bb.rows for bb in iter_batches(ds_syn, ex, 64, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == ex.target.tolist()


def test_pretrain_windows_use_train_part_only(ds_syn):
    o = ds_syn.offsets
    val_rows = o[1:] - 2
    for window in (1, 4, 100):
        pw = PretrainWindows(ds_syn, window)
        assert np.all(pw.end <= val_rows[pw.user]) and np.all(pw.start >= o[pw.user])
        assert pw.lengths.min() >= 2 and pw.lengths.max() <= window + 1
        # default stride: every train transition predicted exactly once
        lens = pw.lengths - 1
        tgt = np.repeat(pw.start + 1, lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        expect = np.concatenate([np.arange(o[u] + 1, val_rows[u]) for u in range(ds_syn.num_users)])
        assert np.array_equal(np.sort(tgt), expect) and pw.num_targets == len(expect)
    pw = PretrainWindows(ds_syn, 4)
    b = pw.batch([0, 1, 2])
    assert tuple(b.features[0].shape) == (3, int(pw.lengths[:3].max()))
    assert b.lengths.tolist() == pw.lengths[:3].tolist()
    assert b.rows.tolist() == (pw.end[:3] - 1).tolist()
    total = sum(len(bb) for bb in pretraining_batches(ds_syn, 4, 32, seed=3))
    assert total == len(pw)
    for split, last in (("val", val_rows), ("test", o[1:] - 1)):
        ev = PretrainWindows(ds_syn, 4, split)
        assert np.array_equal(ev.end - 1, last) and ev.lengths.max() == 5


def test_pretrain_window_count_without_building_them(ds_syn):
    for window, stride in ((4, 4), (4, 1), (50, 3), (1, 1), (100, 100)):
        assert PretrainWindows.count(ds_syn, stride) == len(PretrainWindows(ds_syn, window, "train", stride))
    with pytest.raises(UserError, match="stride"):
        PretrainWindows.count(ds_syn, 0)


def test_next_item_eval_seen_items(ds_syn):
    ev = next_item_eval(ds_syn, 10, "test")
    assert len(ev) == ds_syn.num_users
    item = ds_syn.features["item"]
    for i in (0, 3, len(ev) - 1):
        u, t = int(ev.examples.user[i]), int(ev.examples.target[i])
        assert set(ev.seen(i).tolist()) == set(item[ds_syn.offsets[u]:t].tolist())
    mask = ev.seen_mask([0, 3], ds_syn.num_items)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (2, ds_syn.num_items)
    assert set(torch.nonzero(mask[1]).flatten().tolist()) == set(ev.seen(3).tolist()) - {0}
    kept = ev.seen_mask(np.arange(len(ev)), ds_syn.num_items, keep_target=True)
    assert not kept[torch.arange(len(ev)), torch.from_numpy(ev.examples.labels)].any()
    batches = list(ev.iter_batches(ds_syn, 32))
    assert sum(len(b) for b, _ in batches) == len(ev)
    val = next_item_eval(ds_syn, 10, "val")
    assert np.all(val.seen_offsets[1:] - val.seen_offsets[:-1] == val.examples.target - ds_syn.offsets[:-1])
