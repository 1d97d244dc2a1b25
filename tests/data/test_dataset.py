import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from userllm.data import dataset as dmod
from userllm.data.dataset import FeatureSpec, cache_key, input_files, load_dataset, process_events, sort_order
from userllm.data.events import EventTable, ItemCatalog
from userllm.data.synthetic import SyntheticConfig
from userllm.errors import DataError, UserError

TINY = SyntheticConfig(num_users=30, num_items=40, num_categories=5, min_events=6, max_events=15, seed=1)


def table(users, timestamps, items=None, ratings=None, categories=None, summary=None, text=None, num_items=None):
    """A hand-made EventTable; by default every row has its own item 'i<row>'."""
    n = len(users)
    items = list(range(n)) if items is None else items
    I = num_items or (max(items) + 1)
    cats = categories or [("g%d" % (i % 2),) for i in range(I)]
    return EventTable(
        user=np.array(users, dtype=np.int64), item=np.array(items, dtype=np.int64),
        timestamp=np.array(timestamps, dtype=np.int64),
        rating=np.array(ratings if ratings is not None else [4.0] * n, dtype=np.float32),
        user_ids=np.array([f"user{u}" for u in range(max(users) + 1)]),
        items=ItemCatalog(raw_ids=np.array([f"i{i}" for i in range(I)]), titles=[f"Title {i}" for i in range(I)],
                          categories=cats),
        summary=None if summary is None else np.array(summary, dtype=object),
        text=None if text is None else np.array(text, dtype=object), name="tiny")


def test_sort_is_stable_by_user_time_then_source_row():
    #        row:  0   1  2  3  4  5   6
    users = [1, 0, 0, 1, 0, 0, 1]
    times = [10, 5, 5, 3, 1, 5, 10]
    ds = process_events(table(users, times), min_user_events=3)
    raw = ds.events.items.raw_ids[ds.events.item].tolist()
    assert raw == ["i4", "i1", "i2", "i5", "i3", "i0", "i6"]  # ties (ts 5, ts 10) keep source order
    assert ds.offsets.tolist() == [0, 4, 7]
    assert ds.events.user.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert ds.events.timestamp.tolist() == [1, 5, 5, 5, 3, 10, 10]
    assert ds.events.user_ids.tolist() == ["user0", "user1"]


@pytest.mark.parametrize("span", [50, 2 ** 61])  # composite-key path and the lexsort fallback
def test_sort_order_matches_lexsort(span):
    rng = np.random.default_rng(0)
    user = rng.integers(0, 7, 500)
    ts = rng.integers(0, 20, 500) * (span // 20) - span // 2  # many ties, negative times too
    expect = np.lexsort((np.arange(500), ts, user))
    assert np.array_equal(sort_order(user, ts), expect)


def test_user_filter_and_iterated_item_filter():
    # user 2 has 2 events -> dropped; with min_item_events=2 items 7, 8, 9 (seen once) go, which pushes
    # user 1 below 3 events, which is dropped in the next round
    users = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    items = [5, 6, 7, 5, 6, 8, 9, 6, 5, 6]
    t = table(users, list(range(10)), items=items, num_items=10)
    ds = process_events(t, min_user_events=3)
    assert ds.num_users == 2 and ds.events.user_ids.tolist() == ["user0", "user1"]
    ds2 = process_events(t, min_user_events=3, min_item_events=2)
    assert ds2.num_users == 1 and ds2.num_events == 4
    assert sorted(ds2.events.items.raw_ids.tolist()) == ["i5", "i6"]  # catalog re-indexed
    with pytest.raises(DataError, match="no events left"):
        process_events(t, min_user_events=5, min_item_events=2)
    with pytest.raises(UserError):
        process_events(t, min_user_events=2)


def test_max_user_events_keeps_most_recent():
    users = [0] * 6 + [1] * 3
    ds = process_events(table(users, [6, 5, 4, 3, 2, 1, 1, 2, 3]), min_user_events=3, max_user_events=4)
    assert ds.user_lengths.tolist() == [4, 3]
    assert ds.events.timestamp[:4].tolist() == [3, 4, 5, 6]


def test_features_vocabs_and_helpers():
    cats = [("Drama", "Comedy"), (), ("Comedy",), ("A", "B", "C", "D")]
    users = [0, 0, 0, 0, 0]
    t = table(users, [1, 2, 3, 4, 5], items=[0, 1, 2, 3, 2], ratings=[4.5, np.nan, 1.0, 4.5, 3.0], categories=cats)
    ds = process_events(t, min_user_events=3, max_categories=3)
    assert [s.name for s in ds.feature_specs] == ["item", "rating", "category"]
    assert ds.feature_specs[2] == FeatureSpec("category", len(ds.vocabs["category"]), True)
    f = ds.features
    assert f["item"].dtype == np.int64 and f["category"].dtype == np.int64 and f["category"].shape == (5, 3)
    # item vocab: most frequent first (i2 appears twice)
    assert ds.vocabs["item"].tokens[1] == "i2" and f["item"][2] == 1 and f["item"][4] == 1
    # ratings: ascending values, NaN -> UNK
    assert ds.vocabs["rating"].tokens[1:] == ["1", "3", "4.5"]
    assert f["rating"].tolist() == [3, 0, 1, 3, 2]
    # categories: -1 padded, an item without categories is a row of -1, truncated to max_categories
    assert ds.category_names(f["category"]) == [["Drama", "Comedy"], [], ["Comedy"], ["A", "B", "C"], ["Comedy"]]
    assert f["category"][1].tolist() == [-1, -1, -1]
    assert ds.vocabs["category"].tokens[1] == "Comedy"  # most frequent over events
    assert ds.item_titles([f["item"][0], 0, -1]) == ["Title 0", "<unk>", ""]
    assert ds.category_names([1, -1]) == ["Comedy", ""]
    assert ds.item_categories.shape == (len(ds.vocabs["item"]), 3)
    assert np.array_equal(ds.item_categories[f["item"]], f["category"])
    assert ds.item_index[0] == -1


def test_review_texts_fallback():
    users = [0, 0, 0]
    t = table(users, [1, 2, 3], summary=["s0", None, ""], text=["t0", "t1", None])
    ds = process_events(t, min_user_events=3)
    assert ds.review_texts([0, 1, 2]) == ["s0", "t1", ""]
    assert ds.review_texts([0, 1, 2], "text") == ["t0", "t1", ""]


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("netflix", cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown dataset option"):
        load_dataset("synthetic", cache_dir=tmp_path, colour="red")
    with pytest.raises(UserError, match="needs a path"):
        load_dataset("movielens", cache_dir=tmp_path)
    with pytest.raises(DataError, match="nope"):
        load_dataset("movielens", tmp_path / "nope", cache_dir=tmp_path)
    with pytest.raises(UserError):
        load_dataset("synthetic", tmp_path, cache_dir=tmp_path)
    with pytest.raises(UserError, match="synthetic option"):
        load_dataset("synthetic", cache_dir=tmp_path, synthetic={"num_userz": 3})


def test_synthetic_config_as_dict(tmp_path):
    a = load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    b = load_dataset("synthetic", cache_dir=tmp_path, synthetic=dict(TINY.__dict__))
    assert b.from_cache and b.cache_path == a.cache_path


def _entries(cache_dir: Path):
    return sorted(p.name for p in cache_dir.iterdir())


def _same_ds(a, b):
    return (all(np.array_equal(a.features[k], b.features[k]) for k in a.features)
            and np.array_equal(a.offsets, b.offsets) and a.vocabs == b.vocabs
            and a.events.items.titles == b.events.items.titles
            and list(a.events.text) == list(b.events.text) and a.feature_specs == b.feature_specs)


def test_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    first = load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    assert not first.from_cache and Path(first.cache_path).is_dir()

    def boom(cfg):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(dmod, "generate_synthetic", boom)
    second = load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    assert second.from_cache and second.cache_path == first.cache_path
    assert _same_ds(first, second)
    assert np.array_equal(first.events.rating, second.events.rating, equal_nan=True)
    assert second.events.user_ids.tolist() == first.events.user_ids.tolist()
    # another option is another entry (and here: a rebuild)
    with pytest.raises(AssertionError, match="rebuilt"):
        load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY, min_user_events=6)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("USERLLM_CACHE", str(tmp_path / "env"))
    ds = load_dataset("synthetic", synthetic=TINY)
    assert Path(ds.cache_path).parent == tmp_path / "env"
    ds = load_dataset("synthetic", synthetic=TINY, use_cache=False)
    assert ds.cache_path is None and len(_entries(tmp_path / "env")) == 1


def test_cache_key_changes_with_options_and_inputs(tmp_path):
    f = tmp_path / "ratings.csv"
    f.write_text("a\n")
    (tmp_path / "meta_x.json").write_text("{}\n")
    (tmp_path / "other.txt").write_text("x\n")
    files = input_files(f)
    assert [p.name for p in files] == ["ratings.csv", "meta_x.json"]
    assert [p.name for p in input_files(tmp_path)] == ["meta_x.json", "other.txt", "ratings.csv"]
    k = cache_key("movielens", {"min_user_events": 5}, files)
    assert cache_key("movielens", {"min_user_events": 5}, files) == k
    assert cache_key("movielens", {"min_user_events": 6}, files) != k
    assert cache_key("amazon", {"min_user_events": 5}, files) != k
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_key("movielens", {"min_user_events": 5}, input_files(f)) != k
    (tmp_path / "meta_x.json").write_text("{\"title\": 1}\n")
    k2 = cache_key("movielens", {"min_user_events": 5}, input_files(f))
    f.write_text("a\nb\n")  # size change
    assert cache_key("movielens", {"min_user_events": 5}, input_files(f)) != k2


@pytest.fixture
def fake_reader(monkeypatch):
    """Stand in for the readers package: a movielens 'reader' that counts its calls."""
    calls = []

    def read_events(source, path):
        calls.append((source, str(path)))
        users = [0] * 4 + [1] * 3 + [2] * 2
        return table(users, list(range(9)), items=[0, 1, 2, 3, 0, 1, 2, 0, 1], num_items=4,
                     summary=[f"s{i}" for i in range(9)], text=[None] * 9)

    monkeypatch.setitem(sys.modules, "userllm.data.readers", types.SimpleNamespace(read_events=read_events))
    return calls


def test_file_dataset_cached_by_mtime(tmp_path, fake_reader):
    data = tmp_path / "data"
    data.mkdir()
    f = data / "ratings.csv"
    f.write_text("userId,movieId,rating,timestamp\n")
    cache = tmp_path / "cache"
    a = load_dataset("movielens", f, cache_dir=cache, min_user_events=3)
    b = load_dataset("movielens", f, cache_dir=cache, min_user_events=3)
    assert len(fake_reader) == 1 and b.from_cache and _same_ds(a, b) and b.source == str(f)
    assert b.events.summary.to_list() == [f"s{i}" for i in range(7)] and b.events.text.to_list() == [None] * 7
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    c = load_dataset("movielens", f, cache_dir=cache, min_user_events=3)
    assert len(fake_reader) == 2 and not c.from_cache and len(_entries(cache)) == 2
    with pytest.raises(DataError, match=str(f)):
        load_dataset("movielens", f, cache_dir=cache, min_user_events=5)


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import userllm.utils.cache as cache_mod

    real = cache_mod.sha256_file

    def crash(path):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(cache_mod, "sha256_file", crash)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    assert _entries(tmp_path) == []  # neither the entry nor its temporary directory
    monkeypatch.setattr(cache_mod, "sha256_file", real)
    ds = load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    assert not ds.from_cache
    assert load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY).from_cache


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_file", "delete_manifest", "bad_manifest"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    good = load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    entry = Path(good.cache_path)
    if damage == "flip":
        data = bytearray((entry / "item.npy").read_bytes())
        data[-1] ^= 0x01
        (entry / "item.npy").write_bytes(bytes(data))
    elif damage == "truncate":
        data = (entry / "timestamp.npy").read_bytes()
        (entry / "timestamp.npy").write_bytes(data[: len(data) // 2])
    elif damage == "delete_file":
        (entry / "vocabs.json").unlink()
    elif damage == "delete_manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{\"key\": ")
    again = load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY)
    assert not again.from_cache and _same_ds(good, again)
    assert load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY).from_cache  # repaired
    assert _entries(tmp_path) == [entry.name]


def test_real_movielens_small(tmp_path, shared_data):
    pytest.importorskip("userllm.data.readers")
    path = shared_data / "movielens" / "ml-latest-small"
    if not path.is_dir():
        pytest.skip("ml-latest-small is not present")
    ds = load_dataset("movielens", path, cache_dir=tmp_path)
    assert ds.num_users == 610 and ds.num_events == 100836
    assert np.all(np.diff(ds.offsets) >= 5)
    assert ds.features["category"].shape[1] <= 8 and len(ds.vocabs["category"]) > 15
    assert load_dataset("movielens", path, cache_dir=tmp_path).from_cache


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    import shutil
    import time

    entry = Path(load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY).cache_path)
    stale, fresh = tmp_path / f".{entry.name}.dead.tmp", tmp_path / f".{entry.name}.live.tmp"
    for d in (stale, fresh):
        d.mkdir()
        (d / "item.npy").write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    shutil.rmtree(entry)
    assert not load_dataset("synthetic", cache_dir=tmp_path, synthetic=TINY).from_cache
    assert not stale.exists() and fresh.exists() and entry.is_dir()


def test_favgenre_labels_are_cached_with_the_dataset(tmp_path, monkeypatch):
    from userllm.data import examples as emod

    cfg = SyntheticConfig(num_users=40, num_items=60, num_categories=5, min_events=5, max_events=30, seed=2)
    calls = []
    real = emod.favorite_categories
    monkeypatch.setattr(emod, "favorite_categories", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = load_dataset("synthetic", synthetic=cfg, cache_dir=tmp_path)
    first = emod.make_examples(ds, "favgenre", 10, "train", stride=2)
    again = emod.make_examples(load_dataset("synthetic", synthetic=cfg, cache_dir=tmp_path), "favgenre", 10,
                               "train", stride=2)
    assert len(calls) == 1 and np.array_equal(first.labels, again.labels)
    assert first.labels.dtype == np.int64
    emod.make_examples(ds, "favgenre", 10, "train", stride=3)            # another stride: its own file
    assert len(calls) == 2
    # a damaged or wrong-sized file is recomputed, never trusted
    derived = Path(ds.cache_path) / dmod.DERIVED_DIR / "favgenre-train-w10-s2.npy"
    derived.write_bytes(derived.read_bytes()[:-3] + b"\x00\x00\x00")
    assert np.array_equal(emod.make_examples(ds, "favgenre", 10, "train", stride=2).labels, first.labels)
    assert len(calls) == 3
    assert dmod.cached_derived(ds, "favgenre-train-w10-s2", len(first) + 1, lambda: np.zeros(len(first) + 1)
                               ).tolist() == [0] * (len(first) + 1)
    # without a cache entry it is plain computation
    plain = load_dataset("synthetic", synthetic=cfg, use_cache=False)
    assert np.array_equal(emod.make_examples(plain, "favgenre", 10, "train", stride=2).labels, first.labels)


def test_review_texts_stay_arrow_through_the_cache(tmp_path):
    import pyarrow as pa

    from userllm.data.events import TextColumn

    cfg = SyntheticConfig(num_users=30, num_items=40, min_events=5, max_events=20, seed=4)
    built = load_dataset("synthetic", synthetic=cfg, cache_dir=tmp_path)
    cached = load_dataset("synthetic", synthetic=cfg, cache_dir=tmp_path)
    assert cached.from_cache and isinstance(cached.events.summary, TextColumn)
    assert isinstance(cached.events.summary.arrow, (pa.Array, pa.ChunkedArray))   # not Python strings
    assert cached.events.summary == built.events.summary and cached.events.text == built.events.text
    rows = np.arange(0, cached.num_events, 7)
    assert cached.review_texts(rows, "text") == built.review_texts(rows, "text")
    want = [t or s or "" for t, s in zip(built.events.text.to_list(rows), built.events.summary.to_list(rows))]
    assert cached.review_texts(rows, "text") == want


def test_text_column_basics():
    from userllm.data.events import TextColumn

    col = TextColumn(np.array(["a", None, "", "dd"], dtype=object))
    assert len(col) == 4 and col[0] == "a" and col[1] is None and list(col) == ["a", None, "", "dd"]
    assert col.nonempty().tolist() == [True, False, False, True]
    assert col.take([3, 0]).to_list() == ["dd", "a"] and col.filter(col.nonempty()) == ["a", "dd"]
    other = TextColumn(["x", "y", "z", "w"])
    assert col.or_else(other).to_list() == ["a", "y", "z", "dd"]


def test_category_feature_is_gathered_from_the_item_table():
    ds = process_events(dmod.generate_synthetic(SyntheticConfig(num_users=20, num_items=30, min_events=5,
                                                                max_events=15, seed=1)))
    cat = ds.features["category"]
    assert isinstance(cat, dmod.PerItemFeature) and cat.shape == (ds.num_events, ds.item_categories.shape[1])
    dense = ds.item_categories[ds.features["item"]]           # by vocab id: the same table, other indexing
    assert np.array_equal(np.asarray(cat), dense)
    rows = np.array([[3, 0], [7, 7]])
    assert np.array_equal(cat[rows], dense[rows]) and cat[rows].shape == (2, 2, cat.shape[1])
