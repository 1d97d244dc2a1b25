"""From an :class:`EventTable` to a :class:`ProcessedDataset`: sorted per-user sequences, vocabularies,
per-event feature ids, and an on-disk cache of the result.

Processing (``process_events``), in this order:

1. **Sort** events by (user, timestamp, source row) with a stable sort (:func:`sort_order`): events of
   one user with the same timestamp keep the order in which the source listed them (file order for the
   readers, generation order for the synthetic data).
2. Optionally keep only each user's ``max_user_events`` most recent events.
3. **Filter**: drop users with fewer than ``min_user_events`` events and items with fewer than
   ``min_item_events`` events, repeated until both hold (dropping items can push a user under the
   threshold). An empty result is a :class:`DataError` naming the dataset.
4. Re-index users and items densely (the catalog keeps only the items that remain).
5. **Vocabularies**: "item" (raw item ids, most frequent first), "rating" (distinct rating values in
   ascending order; NaN = no rating -> UNK), "category" (names, most frequent over events first). An
   item's categories are its catalog categories, at most ``max_categories`` (the first ones as the
   source lists them), padded with -1.

Cache: ``<cache_dir>/<name>-<key[:20]>/`` where ``cache_dir`` is the argument, else ``$USERLLM_CACHE``,
else ``~/.cache/userllm``. ``key`` is the SHA-256 of a JSON document holding the dataset name,
:data:`FORMAT_VERSION`, every processing option (and the full :class:`SyntheticConfig` for "synthetic"),
and, for every input file, its absolute path, size and ``st_mtime_ns`` (for a directory: every
non-hidden file below it; for a file: the file and its ``meta*`` siblings, where Amazon/Google metadata
lives). Touching or replacing an input therefore makes a new entry. An entry is written with
:func:`atomic_directory` (it appears whole or not at all) and holds ``.npy`` arrays, JSON (vocabularies,
catalog, manifest) and an Arrow IPC file for review strings; ``manifest.json`` records the SHA-256 and
size of every other file, and an entry is used only if all of them match and the arrays are consistent.
Anything else (a truncated, corrupt or partial entry) is rebuilt and replaced, never trusted.
Arrays derived later from a processed dataset (task labels: :func:`cached_derived`) live in the entry's
``derived/`` folder, each file with its own SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..errors import DataError, UserError
from ..utils.atomic import atomic_directory
from ..utils.cache import json_digest, read_manifest, sha256_file, write_manifest
from .events import EventTable, ItemCatalog, TextColumn
from .synthetic import SyntheticConfig, generate_synthetic
from .vocab import PAD_ID, Vocabulary, rating_vocabulary

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATASET_NAMES = ("synthetic", "movielens", "amazon", "google_local")
FEATURES = ("item", "rating", "category")
DEFAULT_OPTIONS = {"min_item_events": 1, "max_user_events": None}


@dataclass(frozen=True)
class FeatureSpec:
    """One event feature: its name, embedding-table rows (vocabulary size) and whether it is [.., K]."""

    name: str
    num_embeddings: int
    multi_valued: bool = False


class PerItemFeature:
    """An event feature that depends only on the event's item: ``feature[rows] = table[item[rows]]``,
    computed when indexed, so the [E, K] per-event array never exists (1.3 GB of int64 for MovieLens-20M's
    20M events x 8 genre slots; the per-item table is 27k x 8). Indexing (any NumPy index, e.g. an
    int64 [B, L] array of rows) costs one extra gather of B x L item ids.

    table: int64 [I, K] per catalog item; item: int64 [E] catalog index of each event.
    ``np.asarray(feature)`` materialises the whole [E, K] array (tests, small data).
    """

    def __init__(self, table: np.ndarray, item: np.ndarray):
        self.table, self.item = table, item

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.item),) + self.table.shape[1:]

    @property
    def ndim(self) -> int:
        return self.table.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.table.dtype

    def __len__(self) -> int:
        return len(self.item)

    def __getitem__(self, rows):
        return self.table[self.item[rows]]

    def __array__(self, dtype=None, copy=None):
        out = self.table[self.item]
        return out if dtype is None else out.astype(dtype)


@dataclass
class ProcessedDataset:
    """A dataset ready for example construction (see the module docstring for how it is built).

    events:   :class:`EventTable` sorted by (user, timestamp, source row); users and items dense.
    offsets:  int64 [U + 1]; user u's events are rows ``offsets[u]:offsets[u + 1]`` (every user has >= 1).
    vocabs:   {"item", "rating", "category"} -> :class:`Vocabulary`.
    features: per sorted event: "item" int64 [E], "rating" int64 [E], "category" int64 [E, K] (-1 padded;
              a :class:`PerItemFeature`: indexing it gathers from the per-item table).
    feature_specs: [item, rating, category] :class:`FeatureSpec` s.
    item_index:      int64 [V_item]: catalog index (row of ``events.items``) of each item vocab id, -1 for UNK.
    item_categories: int64 [V_item, K]: category ids of each item vocab id (-1 padded; all -1 for UNK).
    """

    name: str
    events: EventTable
    offsets: np.ndarray
    vocabs: dict[str, Vocabulary]
    features: dict[str, np.ndarray | PerItemFeature]
    feature_specs: list[FeatureSpec]
    item_index: np.ndarray
    item_categories: np.ndarray
    source: str | None = None
    options: dict = field(default_factory=dict)
    cache_path: str | None = None
    from_cache: bool = False

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_events(self) -> int:
        return len(self.events)

    @property
    def num_items(self) -> int:
        """Rows of the item embedding table (= item vocabulary size, UNK included)."""
        return len(self.vocabs["item"])

    @property
    def user_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def has_reviews(self) -> bool:
        return self.events.summary is not None or self.events.text is not None

    def item_titles(self, ids: Any) -> list[str]:
        """Titles of item vocab ids (any shape, flattened): UNK -> "<unk>", padding (< 0) -> ""."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        titles = self.events.items.titles
        idx = self.item_index[np.clip(ids, 0, len(self.item_index) - 1)]
        return ["" if i < 0 else (Vocabulary.UNK_TOKEN if c < 0 else titles[c])
                for i, c in zip(ids.tolist(), idx.tolist())]

    def category_names(self, ids: Any) -> list:
        """Names of category vocab ids: a 1-D input gives ``list[str]`` (padding -> ""), a 2-D [n, K]
        input gives ``list[list[str]]`` with the padding dropped."""
        arr = np.asarray(ids, dtype=np.int64)
        vocab = self.vocabs["category"]
        if arr.ndim <= 1:
            return [t or "" for t in vocab.decode(arr.ravel())]
        return [[t for t in row if t is not None] for row in vocab.decode(arr.reshape(len(arr), -1))]

    def review_column(self, rows: Any, field: str = "summary") -> TextColumn:
        """The review strings of sorted event rows as a :class:`TextColumn`: ``field`` ("summary" or
        "text"), falling back to the other column where that one is missing or empty for a row; None
        where neither has a string. Vectorised (Arrow take / if_else): no per-row Python work."""
        if field not in ("summary", "text"):
            raise ValueError(f"review_texts: field must be 'summary' or 'text', got {field!r}")
        other = "text" if field == "summary" else "summary"
        rows = np.asarray(rows, dtype=np.int64).ravel()
        first, second = getattr(self.events, field), getattr(self.events, other)
        if first is None and second is None:
            return TextColumn(pa.nulls(len(rows), pa.large_string()))
        if first is None or second is None:
            return (first if second is None else second).take(rows)
        return first.take(rows).or_else(second.take(rows))

    def review_texts(self, rows: Any, field: str = "summary") -> list[str]:
        """:meth:`review_column` as ``list[str]`` ("" where no review exists)."""
        return [s or "" for s in self.review_column(rows, field).to_list()]


# ---------------------------------------------------------------------------------------- processing
def _check_table(events: EventTable, where: str | None) -> None:
    if len(events) == 0:
        raise DataError("the dataset has no events", where)
    if events.num_users == 0 or events.num_items == 0:
        raise DataError("the dataset has no users or no items", where)
    for col, bound in (("user", events.num_users), ("item", events.num_items)):
        a = getattr(events, col)
        if a.min() < 0 or a.max() >= bound:
            raise DataError(f"event table column {col!r} has indices outside [0, {bound})", where)


def sort_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Row permutation sorting by (user, timestamp, source row): stable, so ties keep source order.

    A stable argsort of the composite int64 key ``user * span + (timestamp - min)`` when it cannot
    overflow (3x faster than ``np.lexsort`` on 20M rows), else ``np.lexsort`` with the row as last key.
    Both give the same permutation.
    """
    E = len(user)
    if E == 0:
        return np.arange(0, dtype=np.int64)
    user = np.asarray(user, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    tmin = int(timestamp.min())
    span = int(timestamp.max()) - tmin + 1
    if int(user.max()) < (2 ** 62) // span:
        return np.argsort(user * span + (timestamp - tmin), kind="stable")
    return np.lexsort((np.arange(E), timestamp, user))


def _filter(user: np.ndarray, item: np.ndarray, num_users: int, num_items: int,
            min_user_events: int, min_item_events: int) -> np.ndarray:
    """Boolean mask of events kept by the iterated user/item count filter."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        ucount = np.bincount(user[keep], minlength=num_users)
        icount = np.bincount(item[keep], minlength=num_items)
        new = keep & (ucount[user] >= min_user_events) & (icount[item] >= min_item_events)
        if new.sum() == keep.sum():
            return new
        keep = new


def process_events(events: EventTable, *, name: str | None = None, source: str | None = None,
                   min_user_events: int = 5, max_categories: int = 8, min_item_events: int = 1,
                   max_user_events: int | None = None) -> ProcessedDataset:
    """Sort, filter, re-index and encode ``events`` (see the module docstring). Pure; no caching."""
    name = name or events.name
    where = source or name
    if min_user_events < 3:
        raise UserError(f"min_user_events must be >= 3 (leave-last-out needs a history, a validation and "
                        f"a test event), got {min_user_events}")
    if max_categories < 1:
        raise UserError(f"max_categories must be >= 1, got {max_categories}")
    if min_item_events < 1:
        raise UserError(f"min_item_events must be >= 1, got {min_item_events}")
    if max_user_events is not None and max_user_events < min_user_events:
        raise UserError(f"max_user_events ({max_user_events}) must be >= min_user_events ({min_user_events})")
    _check_table(events, where)

    E = len(events)
    order = sort_order(events.user, events.timestamp)  # 1.
    user, item = events.user[order], events.item[order]
    rows = np.arange(E)
    if max_user_events is not None:  # 2. each user's most recent events
        counts = np.bincount(user, minlength=events.num_users)
        first = np.r_[0, np.cumsum(counts)][user]
        rows = np.flatnonzero(rows - first >= counts[user] - max_user_events)
    # 3. iterated count filter
    keep = _filter(user[rows], item[rows], events.num_users, events.num_items, min_user_events, min_item_events)
    if not keep.any():
        raise DataError(f"no events left after filtering (min_user_events={min_user_events}, "
                        f"min_item_events={min_item_events}; {E} events, {events.num_users} users before)",
                        where)
    order = order[rows[keep]]

    # 4. dense re-indexing of the users and items that remain
    users_kept, user = _dense(events.user[order], events.num_users)
    items_kept, item = _dense(events.item[order], events.num_items)
    cat = events.items
    catalog = ItemCatalog(raw_ids=np.asarray(cat.raw_ids)[items_kept],
                          titles=[cat.titles[i] for i in items_kept.tolist()],
                          categories=[tuple(cat.categories[i]) for i in items_kept.tolist()])
    sorted_events = EventTable(
        user=user, item=item, timestamp=np.asarray(events.timestamp[order], dtype=np.int64),
        rating=np.asarray(events.rating[order], dtype=np.float32),
        user_ids=np.asarray(events.user_ids)[users_kept], items=catalog,
        summary=None if events.summary is None else events.summary.take(order),
        text=None if events.text is None else events.text.take(order),
        name=name, meta=dict(events.meta),
    )
    offsets = np.r_[0, np.cumsum(np.bincount(user, minlength=len(users_kept)))].astype(np.int64)

    # 5. vocabularies and per-event ids
    item_vocab, item_to_vocab = _item_vocabulary(catalog, item, where)
    rating_vocab, rating_ids = _rating_ids(sorted_events.rating)
    category_vocab, item_cat_table = _category_table(catalog, item, max_categories)
    return _assemble(name, sorted_events, offsets, item_vocab, rating_vocab, category_vocab, item_to_vocab,
                     item_cat_table, rating_ids, source,
                     dict(min_user_events=min_user_events, max_categories=max_categories,
                          min_item_events=min_item_events, max_user_events=max_user_events))


def _dense(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept old indices ascending, new dense index per row): an O(E) np.unique for bounded ints."""
    present = np.bincount(index, minlength=size) > 0
    remap = np.cumsum(present) - 1
    return np.flatnonzero(present), remap[index].astype(np.int64)


def _rating_ids(rating: np.ndarray) -> tuple[Vocabulary, np.ndarray]:
    """Rating vocabulary (distinct values ascending, NaN -> UNK) and ids.

    Hash-based (Arrow ``dictionary_encode``, O(E)) instead of sorting all E ratings: a source has few
    distinct rating values.
    """
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(pa.array(np.asarray(rating)))
    uniq = encoded.dictionary.to_numpy(zero_copy_only=False)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    vocab = rating_vocabulary(uniq)
    return vocab, vocab.encode(uniq)[codes]


def _item_vocabulary(catalog: ItemCatalog, item: np.ndarray, where) -> tuple[Vocabulary, np.ndarray]:
    """Item vocabulary (most frequent first, ties by raw id) and the catalog-index -> vocab-id map."""
    raw = np.asarray(catalog.raw_ids).astype(str)
    counts = np.bincount(item, minlength=len(raw))
    perm = np.lexsort((raw, -counts))
    if len(np.unique(raw)) != len(raw):
        raise DataError("the item catalog has duplicate item ids", where)
    vocab = Vocabulary(raw[perm].tolist(), name="item", counts=counts[perm])
    to_vocab = np.empty(len(raw), dtype=np.int64)
    to_vocab[perm] = np.arange(1, len(raw) + 1)
    return vocab, to_vocab


def _category_table(catalog: ItemCatalog, item: np.ndarray, max_categories: int):
    """Category vocabulary (by event frequency) and the [I, K] table of each catalog item's category ids."""
    events_per_item = np.bincount(item, minlength=len(catalog)).tolist()
    cats = [tuple(c)[:max_categories] for c in catalog.categories]
    counter: Counter = Counter()
    for c, n in zip(cats, events_per_item):
        for name in c:
            counter[name] += n
    names = sorted(counter, key=lambda k: (-counter[k], k))
    vocab = Vocabulary(names, name="category", counts=[counter[k] for k in names])
    K = max(1, max((len(c) for c in cats), default=0))
    table = np.full((len(cats), K), PAD_ID, dtype=np.int64)
    for i, c in enumerate(cats):
        if c:
            table[i, : len(c)] = [vocab.id(n) for n in c]
    return vocab, table


def _assemble(name, events, offsets, item_vocab, rating_vocab, category_vocab, item_to_vocab, item_cat_table,
              rating_ids, source, options) -> ProcessedDataset:
    """Build the :class:`ProcessedDataset` from the (cacheable) item-level tables."""
    item_index = np.full(len(item_vocab), -1, dtype=np.int64)
    item_index[item_to_vocab] = np.arange(len(item_to_vocab))
    item_categories = np.full((len(item_vocab), item_cat_table.shape[1]), PAD_ID, dtype=np.int64)
    item_categories[item_to_vocab] = item_cat_table
    features = {
        "item": item_to_vocab[events.item],
        "rating": np.asarray(rating_ids, dtype=np.int64),
        "category": PerItemFeature(item_cat_table, events.item),
    }
    specs = [FeatureSpec("item", len(item_vocab), False), FeatureSpec("rating", len(rating_vocab), False),
             FeatureSpec("category", len(category_vocab), True)]
    return ProcessedDataset(name=name, events=events, offsets=offsets,
                            vocabs={"item": item_vocab, "rating": rating_vocab, "category": category_vocab},
                            features=features, feature_specs=specs, item_index=item_index,
                            item_categories=item_categories, source=source, options=options)


# ---------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    env = os.environ.get("USERLLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "userllm"


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files whose (path, size, mtime) enter the cache key: see the module docstring."""
    p = Path(path).resolve()
    if p.is_dir():
        return sorted(f for f in p.rglob("*")
                      if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    siblings = [f for f in p.parent.iterdir() if f.is_file() and f.name.startswith("meta") and f != p]
    return [p] + sorted(siblings)


def cache_key(name: str, options: dict, files: list[Path]) -> str:
    inputs = []
    for f in files:
        st = f.stat()
        inputs.append([str(f), st.st_size, st.st_mtime_ns])
    doc = {"name": name, "format": FORMAT_VERSION, "options": options, "inputs": inputs}
    return json_digest(doc)


def _compact(a: np.ndarray) -> np.ndarray:
    """Smallest signed integer dtype that holds ``a`` (the cache stores ids compactly; loads give int64)."""
    if a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    for dt in (np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a


def _write_entry(dest: Path, key: str, ds: ProcessedDataset, item_to_vocab: np.ndarray,
                 item_cat_table: np.ndarray) -> None:

    ev = ds.events
    arrays = {
        "user": _compact(ev.user), "item": _compact(ev.item), "timestamp": ev.timestamp,
        "rating": ev.rating, "offsets": ds.offsets, "rating_ids": _compact(ds.features["rating"]),
        "user_ids": np.asarray(ev.user_ids).astype(str), "item_raw_ids": np.asarray(ev.items.raw_ids).astype(str),
        "item_to_vocab": item_to_vocab, "item_cat_table": _compact(item_cat_table),
    }
    with atomic_directory(dest) as tmp:
        for k, a in arrays.items():
            np.save(tmp / f"{k}.npy", a, allow_pickle=False)
        (tmp / "vocabs.json").write_text(json.dumps({k: v.to_dict() for k, v in ds.vocabs.items()},
                                                    ensure_ascii=False))
        (tmp / "catalog.json").write_text(json.dumps({"titles": ev.items.titles,
                                                      "categories": [list(c) for c in ev.items.categories]},
                                                     ensure_ascii=False))
        cols = {c: getattr(ev, c) for c in ("summary", "text") if getattr(ev, c) is not None}
        if cols:
            table = pa.table({c: v.arrow for c, v in cols.items()})
            with pa.OSFile(str(tmp / "reviews.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
        write_manifest(tmp, key=key, format=FORMAT_VERSION, name=ds.name, source=ds.source, options=ds.options,
                       num_events=len(ev), num_users=ds.num_users, columns=sorted(cols), meta=ev.meta)


def _read_entry(entry: Path, key: str) -> ProcessedDataset:
    """Load and validate a cache entry; any problem raises (the caller rebuilds)."""

    manifest = read_manifest(entry)
    if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
        raise ValueError("cache key or format mismatch")
    a = {k: np.load(entry / f"{k}.npy", allow_pickle=False)
         for k in ("user", "item", "timestamp", "rating", "offsets", "rating_ids", "user_ids", "item_raw_ids",
                   "item_to_vocab", "item_cat_table")}
    vocabs = {k: Vocabulary.from_dict(v) for k, v in json.loads((entry / "vocabs.json").read_text()).items()}
    catalog_doc = json.loads((entry / "catalog.json").read_text())
    E, U, I = manifest["num_events"], manifest["num_users"], len(a["item_raw_ids"])
    cols: dict[str, TextColumn] = {}
    if manifest["columns"]:
        # Memory-mapped, never converted to Python strings: the Arrow buffers keep the mapping alive.
        table = pa.ipc.open_file(pa.memory_map(str(entry / "reviews.arrow"))).read_all()
        for c in manifest["columns"]:
            cols[c] = TextColumn(table.column(c))
    checks = [len(a[k]) == E for k in ("user", "item", "timestamp", "rating", "rating_ids")]
    checks += [len(v) == E for v in cols.values()]
    checks += [len(a["offsets"]) == U + 1, a["offsets"][-1] == E, len(a["user_ids"]) == U,
               len(catalog_doc["titles"]) == I, len(catalog_doc["categories"]) == I,
               len(a["item_to_vocab"]) == I, len(a["item_cat_table"]) == I,
               set(vocabs) == set(FEATURES), len(vocabs["item"]) == I + 1]
    if not all(checks):
        raise ValueError("cache entry arrays are inconsistent")
    catalog = ItemCatalog(raw_ids=a["item_raw_ids"], titles=catalog_doc["titles"],
                          categories=[tuple(c) for c in catalog_doc["categories"]])
    events = EventTable(user=a["user"].astype(np.int64), item=a["item"].astype(np.int64),
                        timestamp=a["timestamp"].astype(np.int64), rating=a["rating"].astype(np.float32),
                        user_ids=a["user_ids"], items=catalog, summary=cols.get("summary"), text=cols.get("text"),
                        name=manifest["name"], meta=manifest.get("meta") or {})
    ds = _assemble(manifest["name"], events, a["offsets"].astype(np.int64), vocabs["item"], vocabs["rating"],
                   vocabs["category"], a["item_to_vocab"].astype(np.int64),
                   a["item_cat_table"].astype(np.int64), a["rating_ids"], manifest["source"], manifest["options"])
    ds.cache_path, ds.from_cache = str(entry), True
    return ds


DERIVED_DIR = "derived"


def cached_derived(ds: ProcessedDataset, name: str, length: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()`` (an integer array that depends only on ``ds``, e.g. task labels), cached in the
    dataset's cache entry as ``derived/<name>.npy`` beside its SHA-256 (``<name>.sha256``).

    Each file is written atomically; a file whose checksum does not match (a crash between the two
    writes, a damaged disk) or length does not match is recomputed and replaced, never trusted. Without a cache entry
    (``use_cache=False``) this is just ``compute()``. Loads give int64 (the file is stored compactly).
    """
    from ..utils.atomic import write_bytes, write_text

    if not ds.cache_path:
        return np.asarray(compute(), dtype=np.int64)
    folder = Path(ds.cache_path) / DERIVED_DIR
    path, digest_path = folder / f"{name}.npy", folder / f"{name}.sha256"
    try:
        if path.is_file() and digest_path.is_file() and sha256_file(path) == digest_path.read_text().strip():
            value = np.load(path, allow_pickle=False)
            if value.shape == (length,):
                return value.astype(np.int64)
    except (OSError, ValueError) as exc:
        log.warning("derived cache file %s is unusable (%s); recomputing it", path, exc)
    value = np.asarray(compute(), dtype=np.int64)
    buf = io.BytesIO()
    np.save(buf, _compact(value), allow_pickle=False)
    try:
        write_bytes(path, buf.getvalue())
        write_text(digest_path, hashlib.sha256(buf.getvalue()).hexdigest())
    except OSError as exc:  # an unwritable cache costs a recomputation next time, not this run
        log.warning("could not write the derived cache file %s (%s)", path, exc)
    return value


def _remove_stale_temporaries(entry: Path, max_age_s: float = 3600.0) -> None:
    """Delete this entry's temporary directories left by writers killed more than ``max_age_s`` ago
    (a live writer's directory is younger; a killed one's is never read, only wastes disk)."""
    import shutil
    import time

    if not entry.parent.is_dir():
        return
    now = time.time()
    for tmp in entry.parent.glob(f".{entry.name}.*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------- entry point
def load_dataset(name: str, path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                 min_user_events: int = 5, max_categories: int = 8, synthetic: SyntheticConfig | dict | None = None,
                 use_cache: bool = True, **options: Any) -> ProcessedDataset:
    """Load (from the cache when possible) and process a dataset.

    name: "synthetic" (generated from ``synthetic``: a :class:`SyntheticConfig` or a dict of its fields,
          default ``SyntheticConfig()``; no ``path``) or a
          reader source "movielens" | "amazon" | "google_local" (``path``: its file or directory).
    options: ``min_item_events`` (default 1: no item filter), ``max_user_events`` (default None: all).
    use_cache: False skips the cache entirely (neither read nor written).
    Raises :class:`UserError` for bad arguments and :class:`DataError` for missing/unreadable/empty data.
    """
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise UserError(f"unknown dataset option(s) {', '.join(unknown)}; known: min_user_events, "
                        f"max_categories, {', '.join(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options, "min_user_events": min_user_events, "max_categories": max_categories}
    if name == "synthetic":
        if path is not None:
            raise UserError("the synthetic dataset takes no path (configure it with a SyntheticConfig)")
        if isinstance(synthetic, dict):  # e.g. from a JSON/YAML run config
            unknown_fields = sorted(set(synthetic) - set(SyntheticConfig.__dataclass_fields__))
            if unknown_fields:
                raise UserError(f"unknown synthetic option(s) {', '.join(unknown_fields)}")
            synthetic = SyntheticConfig(**synthetic)
        synthetic = SyntheticConfig() if synthetic is None else synthetic
        key_options = {**opts, "synthetic": asdict(synthetic)}
        files: list[Path] = []
        source = None
    else:
        if synthetic is not None:
            raise UserError(f"a SyntheticConfig was given for the {name!r} dataset")
        if path is None:
            raise UserError(f"the {name!r} dataset needs a path to its files")
        if not Path(path).exists():
            raise DataError("no such file or directory", path)
        key_options = opts
        files = input_files(path)
        source = os.fspath(path)

    key = cache_key(name, key_options, files)
    entry = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{name}-{key[:20]}"
    if use_cache and entry.is_dir():
        try:
            return _read_entry(entry, key)
        except Exception as exc:  # a damaged entry is rebuilt, never trusted
            log.warning("cache entry %s is unusable (%s); rebuilding it", entry, exc)

    if name == "synthetic":
        events = generate_synthetic(synthetic)
    else:
        try:
            from .readers import read_events
        except ImportError as exc:  # the readers package is optional for synthetic-only installs
            raise UserError(f"cannot read {name!r} data: the readers are unavailable ({exc})") from exc
        events = read_events(name, path)
    ds = process_events(events, name=name, source=source, **opts)
    if use_cache:
        _remove_stale_temporaries(entry)
        ds.cache_path = str(entry)
        item_to_vocab = np.empty(len(ds.events.items), dtype=np.int64)
        item_to_vocab[ds.item_index[1:]] = np.arange(1, ds.num_items)
        item_cat_table = ds.item_categories[item_to_vocab]
        try:
            _write_entry(entry, key, ds, item_to_vocab, item_cat_table)
        except OSError as exc:  # an unwritable cache costs a rebuild next time, not this run
            log.warning("could not write the cache entry %s (%s)", entry, exc)
            ds.cache_path = None
    return ds
