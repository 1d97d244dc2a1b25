"""Task examples over per-user sequences, with the leave-last-out split, and their batching.

Split (per user, rows ``o .. o + n - 1`` of the sorted events, ``n >= 3`` guaranteed by the loader):

* test:  target = the user's last event ``o + n - 1``;
* val:   target = the one before, ``o + n - 2``;
* train: targets ``o + 1 .. o + n - 3`` (every earlier event that has at least one event before it),
  taken every ``stride`` rows counting back from ``o + n - 3`` (so the most recent one is always in).

An example's input window is the up to ``window`` events right before its target, rows
``[max(o, target - window), target)``. A train window therefore ends at most at row ``o + n - 4`` and
never contains the val or test event, and no val/test event is ever a train target.

Tasks and labels:

* ``nextitem``: label = the target event's item vocab id.
* ``favgenre`` (``favcat`` on non-movie data, same thing): label = the category vocab id occurring in the
  most window events. Ties go to the tied category seen most recently in the window (largest position),
  then, for categories of that same event, to the lowest id. UNK (id 0) never counts. Examples whose
  window has no category at all are dropped; a dataset without categories is a :class:`UserError`.
* ``reviewg``: ``texts`` = the target event's review summary (``text_field="summary"``, falling back to the
  full text where a row has no summary) or text; the item / category / rating ids the model is given are
  the target event's features (``EventBatch.target``); labels are -1. Examples whose target has no review
  string are dropped; a dataset without reviews is a :class:`UserError`.

Batches are right-padded with -1 (the kernels' padding id); see :class:`EventBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from .dataset import ProcessedDataset, cached_derived
from .events import TextColumn
from .vocab import PAD_ID, UNK_ID

TASKS = ("nextitem", "favgenre", "reviewg")
TASK_ALIASES = {"favcat": "favgenre"}
SPLITS = ("train", "val", "test")


@dataclass
class Examples:
    """Examples of one task and split; arrays of length n.

    user:   int64 [n] dense user index.
    target: int64 [n] sorted-event row of the target event.
    start:  int64 [n] first row of the input window (the window is rows ``start .. target - 1``).
    labels: int64 [n] item vocab id (nextitem), category vocab id (favgenre) or -1 (reviewg).
    texts:  reviewg targets (a :class:`~userllm.data.events.TextColumn` of n non-empty strings), else None.
    """

    task: str
    split: str
    window: int
    user: np.ndarray
    target: np.ndarray
    start: np.ndarray
    labels: np.ndarray
    texts: TextColumn | None = None

    def __len__(self) -> int:
        return len(self.target)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n]: window lengths (>= 1)."""
        return self.target - self.start

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Examples":
        idx = np.asarray(idx, dtype=np.int64)
        texts = None if self.texts is None else self.texts.take(idx)
        return replace(self, user=self.user[idx], target=self.target[idx], start=self.start[idx],
                       labels=self.labels[idx], texts=texts)


@dataclass
class EventBatch:
    """A padded batch of event windows (B rows, L = the longest window in the batch).

    features: one tensor per ``ds.feature_specs`` entry: int64 [B, L] (single-valued) or [B, L, K]
              (multi-valued); right-padded, -1 = padding (also for empty category slots).
    lengths:  int64 [B], real events per row (>= 1).
    labels:   int64 [B] (see the task; -1 when there is none).
    target:   the target event's feature ids, one tensor per feature: [B] / [B, K].
    rows:     int64 [B] sorted-event row of the target (to fetch strings: titles, reviews).
    users:    int64 [B] dense user index.
    texts:    reviewg target strings, else None.
    """

    features: list[torch.Tensor]
    lengths: torch.Tensor
    labels: torch.Tensor
    target: list[torch.Tensor]
    rows: torch.Tensor
    users: torch.Tensor | None = None
    texts: list[str] | None = None

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def to(self, device: torch.device | str) -> "EventBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, features=[move(f) for f in self.features], lengths=move(self.lengths),
                       labels=move(self.labels), target=[move(t) for t in self.target], rows=move(self.rows),
                       users=move(self.users))

    def pin_memory(self) -> "EventBatch":
        """The batch in page-locked memory (``DataLoader(pin_memory=True)`` calls this in its pin thread)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, features=[pin(f) for f in self.features], lengths=pin(self.lengths),
                       labels=pin(self.labels), target=[pin(t) for t in self.target], rows=pin(self.rows),
                       users=pin(self.users))


# ---------------------------------------------------------------------------------------- split
def _check(task: str | None, window: int, split: str, stride: int = 1) -> str | None:
    if task is not None:
        task = TASK_ALIASES.get(task, task)
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)} (or favcat)")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if window < 1:
        raise UserError(f"window must be >= 1, got {window}")
    if stride < 1:
        raise UserError(f"stride must be >= 1, got {stride}")
    return task


def split_targets(ds: ProcessedDataset, split: str, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(user [n], target row [n]) of a split, sorted by user then row (rules in the module docstring)."""
    o, n = ds.offsets[:-1], np.diff(ds.offsets)
    users = np.arange(len(n), dtype=np.int64)
    if split == "test":
        return users, o + n - 1
    if split == "val":
        keep = n >= 2
        return users[keep], (o + n - 2)[keep]
    last = o + n - 3                                   # most recent train target
    count = np.where(n >= 4, (n - 4) // stride + 1, 0)  # targets last, last - stride, ... >= o + 1
    user = np.repeat(users, count)
    first_of_user = np.repeat(np.cumsum(count) - count, count)
    back = count[user] - 1 - (np.arange(len(user)) - first_of_user)  # ascending rows within a user
    return user, last[user] - stride * back


def _windows(ds: ProcessedDataset, user: np.ndarray, target: np.ndarray, window: int) -> np.ndarray:
    return np.maximum(ds.offsets[user], target - window)


# ---------------------------------------------------------------------------------------- labels
def favorite_categories(categories: np.ndarray, start: np.ndarray, end: np.ndarray, num_categories: int,
                        chunk_elems: int = 1 << 22) -> np.ndarray:
    """Most frequent category id over rows ``[start, end)`` of ``categories`` ([E, K], -1 padded).

    Tie-break: the tied category seen most recently (largest row), then the lowest id. UNK (0) and
    padding never count. Returns int64 [n]; -1 where the range has no category. Vectorized over chunks
    of examples (memory ~ ``chunk_elems`` int64s).
    """
    n = len(start)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return out
    lengths = end - start
    W, K, C = max(1, int(lengths.max())), categories.shape[1], max(1, num_categories)
    step = max(1, chunk_elems // max(W * K, C))
    pos = np.arange(W)
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        valid = pos[None, :] < lengths[a:b, None]                            # [m, W]
        cats = categories[np.where(valid, start[a:b, None] + pos, 0)]          # [m, W, K]
        ok = valid[:, :, None] & (cats > UNK_ID)
        ex = np.broadcast_to(np.arange(m)[:, None, None], cats.shape)[ok]
        flat = ex * C + cats[ok]
        counts = np.bincount(flat, minlength=m * C).reshape(m, C)
        last = np.full(m * C, -1, dtype=np.int64)
        np.maximum.at(last, flat, np.broadcast_to(pos[None, :, None], cats.shape)[ok])
        key = counts * (W + 1) + last.reshape(m, C) + 1                    # count first, then recency
        key[counts == 0] = 0
        best = key.argmax(axis=1)                                           # first max = lowest id
        out[a:b] = np.where(key[np.arange(m), best] > 0, best, -1)
    return out


def make_examples(ds: ProcessedDataset, task: str, window: int, split: str, stride: int = 1, *,
                  text_field: str = "summary") -> Examples:
    """Examples of ``task`` for ``split`` with input windows of up to ``window`` events (module docstring)."""
    task = _check(task, window, split, stride)
    user, target = split_targets(ds, split, stride)
    start = _windows(ds, user, target, window)
    texts = None
    if task == "nextitem":
        labels = ds.features["item"][target]
    elif task == "favgenre":
        if len(ds.vocabs["category"]) <= 1:
            raise UserError(f"the favgenre task needs item categories, and the {ds.name!r} dataset has none")
        # 160 s at 19.6M examples (MovieLens-20M, stride 1): computed once per (split, window, stride).
        labels = cached_derived(ds, f"favgenre-{split}-w{window}-s{stride}", len(target), lambda: favorite_categories(
            ds.features["category"], start, target, len(ds.vocabs["category"])))
        keep = labels >= 0
        user, target, start, labels = user[keep], target[keep], start[keep], labels[keep]
    else:
        if not ds.has_reviews:
            raise UserError(f"the reviewg task needs review texts, and the {ds.name!r} dataset has none")
        column = ds.review_column(target, text_field)
        keep = column.nonempty()
        user, target, start = user[keep], target[keep], start[keep]
        texts = column.filter(keep)
        labels = np.full(len(target), -1, dtype=np.int64)
    return Examples(task=task, split=split, window=window, user=user.astype(np.int64),
                    target=target.astype(np.int64), start=start.astype(np.int64),
                    labels=np.asarray(labels, dtype=np.int64), texts=texts)


# ---------------------------------------------------------------------------------------- batching
def gather_windows(ds: ProcessedDataset, start: np.ndarray, end: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of rows ``[start[b], end[b])`` right-padded with -1: ([B, L] / [B, L, K] per feature, lengths [B]).

    One fancy-indexing gather per feature (no per-event Python work).
    """
    start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
    lengths = end - start
    L = max(1, int(lengths.max())) if len(lengths) else 1
    pos = np.arange(L)
    valid = pos[None, :] < lengths[:, None]
    rows = np.where(valid, start[:, None] + pos, 0)
    feats = []
    for spec in ds.feature_specs:
        x = ds.features[spec.name][rows]
        mask = valid if x.ndim == 2 else valid[:, :, None]
        feats.append(torch.from_numpy(np.where(mask, x, PAD_ID)))
    return feats, torch.from_numpy(lengths)


def target_features(ds: ProcessedDataset, rows: np.ndarray) -> list[torch.Tensor]:
    """Feature ids of single events: [B] / [B, K] per feature."""
    rows = np.asarray(rows, dtype=np.int64)
    return [torch.from_numpy(np.ascontiguousarray(ds.features[s.name][rows])) for s in ds.feature_specs]


def collate(ds: ProcessedDataset, examples: Examples, idx: Sequence[int] | np.ndarray) -> EventBatch:
    """The :class:`EventBatch` of ``examples[idx]``."""
    idx = np.asarray(idx, dtype=np.int64)
    target = examples.target[idx]
    feats, lengths = gather_windows(ds, examples.start[idx], target)
    texts = None if examples.texts is None else examples.texts.to_list(idx)
    return EventBatch(features=feats, lengths=lengths, labels=torch.from_numpy(examples.labels[idx].copy()),
                      target=target_features(ds, target), rows=torch.from_numpy(target.copy()),
                      users=torch.from_numpy(examples.user[idx].copy()), texts=texts)


def batch_indices(n: int, batch_size: int, shuffle: bool = False, seed: int = 0,
                  drop_last: bool = False) -> Iterator[np.ndarray]:
    """Index arrays of consecutive (or, with ``shuffle``, seeded random) batches over ``range(n)``."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for a in range(0, stop, batch_size):
        yield order[a:a + batch_size]


def iter_batches(ds: ProcessedDataset, examples: Examples, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False) -> Iterator[EventBatch]:
    for idx in batch_indices(len(examples), batch_size, shuffle, seed, drop_last):
        yield collate(ds, examples, idx)


# ---------------------------------------------------------------------------------------- pretraining
def _train_windows_per_user(events: np.ndarray, stride: int) -> np.ndarray:
    """int64 [users]: the "train" windows of :class:`PretrainWindows` per user of ``events`` events (its
    train part is all but the val and test events; a window needs 2 of them, one every ``stride`` rows)."""
    m = events - 2
    return np.where(m >= 2, (m - 2) // stride + 1, 0)


class PretrainWindows:
    """Windows of up to ``window + 1`` consecutive events for autoregressive next-event pretraining.

    split "train": chunks of each user's train part (rows before the val event, so neither the val nor
    the test event is ever seen), cut from the most recent event backwards every ``stride`` rows
    (default ``window``: consecutive chunks share exactly one event, so every train transition is
    predicted exactly once and no prediction target repeats: non-overlapping targets). Chunks of fewer
    than 2 events (nothing to predict) are skipped.
    split "val" / "test": one window per user: the ``window + 1`` events ending with the val / test
    event. A loss on them covers earlier positions too; for the held-out event alone take the last
    position (``lengths - 1``).

    Arrays (length n): ``user``, ``start``, ``end`` (exclusive), ``lengths``.
    """

    def __init__(self, ds: ProcessedDataset, window: int, split: str = "train", stride: int | None = None):
        stride = window if stride is None else stride
        _check(None, window, split, stride)
        self.ds, self.window, self.split, self.stride = ds, window, split, stride
        o, n = ds.offsets[:-1], np.diff(ds.offsets)
        users = np.arange(len(n), dtype=np.int64)
        if split == "train":
            m = n - 2                                        # train part: rows o .. o + m - 1
            count = _train_windows_per_user(n, stride)
            user = np.repeat(users, count)
            first_of_user = np.repeat(np.cumsum(count) - count, count)
            back = count[user] - 1 - (np.arange(len(user)) - first_of_user)
            end = o[user] + m[user] - stride * back
        else:
            user = users if split == "test" else users[n >= 2]
            end = o[user] + n[user] - (0 if split == "test" else 1)
        self.user = user
        self.end = end.astype(np.int64)
        self.start = np.maximum(o[user], self.end - (window + 1)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.end)

    @staticmethod
    def count(ds: ProcessedDataset, stride: int) -> int:
        """How many "train" windows ``stride`` gives (any window size), without building them: e.g. the
        stride-1 count (one window per train target, the paper's) beside a run's own."""
        if stride < 1:
            raise UserError(f"stride must be >= 1, got {stride}")
        return int(_train_windows_per_user(np.diff(ds.offsets), stride).sum())

    def subset(self, idx: Sequence[int] | np.ndarray) -> "PretrainWindows":
        """The windows ``idx`` (in that order), e.g. a fixed random sample for ``--max-train-examples``."""
        idx = np.asarray(idx, dtype=np.int64)
        out = object.__new__(PretrainWindows)
        out.__dict__.update(self.__dict__)
        out.user, out.start, out.end = self.user[idx], self.start[idx], self.end[idx]
        return out

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.start

    @property
    def num_targets(self) -> int:
        """Next-event predictions in all windows (sum of lengths - 1)."""
        return int((self.lengths - 1).sum())

    def batch(self, idx: Sequence[int] | np.ndarray) -> EventBatch:
        """EventBatch of windows ``idx``: ``features``/``lengths`` are the windows (up to window + 1 events),
        ``target``/``rows``/``labels`` describe each window's last event (labels = its item id)."""
        idx = np.asarray(idx, dtype=np.int64)
        feats, lengths = gather_windows(self.ds, self.start[idx], self.end[idx])
        last = self.end[idx] - 1
        return EventBatch(features=feats, lengths=lengths,
                          labels=torch.from_numpy(self.ds.features["item"][last]),
                          target=target_features(self.ds, last), rows=torch.from_numpy(last),
                          users=torch.from_numpy(self.user[idx].copy()))

    collate = batch

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False) -> Iterator[EventBatch]:
        for idx in batch_indices(len(self), batch_size, shuffle, seed, drop_last):
            yield self.batch(idx)


def pretraining_batches(ds: ProcessedDataset, window: int, batch_size: int, split: str = "train",
                        shuffle: bool = True, seed: int = 0, stride: int | None = None,
                        drop_last: bool = False) -> Iterator[EventBatch]:
    """One epoch of :class:`PretrainWindows` batches (a new ``seed`` per epoch reshuffles)."""
    yield from PretrainWindows(ds, window, split, stride).iter_batches(batch_size, shuffle, seed, drop_last)


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class NextItemEval:
    """Full-ranking next-item evaluation set for one split (one example per user).

    examples: nextitem :class:`Examples` (window before the target; labels = target item ids).
    seen_offsets int64 [n + 1], seen_items int64 [nnz]: CSR lists of the item ids of *all* the user's
    events before the target (not only the window), for ``filter_seen``. When a user re-consumes an
    item, the target is in its own list; :meth:`seen_mask` can keep it unmasked.
    """

    examples: Examples
    seen_offsets: np.ndarray
    seen_items: np.ndarray

    def __len__(self) -> int:
        return len(self.examples)

    def seen(self, i: int) -> np.ndarray:
        return self.seen_items[self.seen_offsets[i]:self.seen_offsets[i + 1]]

    def seen_mask(self, idx: Sequence[int] | np.ndarray, num_items: int, keep_target: bool = False) -> torch.Tensor:
        """bool [B, num_items]: True where the item was seen before the target (UNK/padding never set)."""
        idx = np.asarray(idx, dtype=np.int64)
        a, b = self.seen_offsets[idx], self.seen_offsets[idx + 1]
        counts = b - a
        row = np.repeat(np.arange(len(idx)), counts)
        flat = np.repeat(a - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(int(counts.sum()))
        mask = np.zeros((len(idx), num_items), dtype=bool)
        mask[row, self.seen_items[flat]] = True
        mask[:, UNK_ID] = False
        if keep_target:
            mask[np.arange(len(idx)), self.examples.labels[idx]] = False
        return torch.from_numpy(mask)

    def iter_batches(self, ds: ProcessedDataset, batch_size: int) -> Iterator[tuple[EventBatch, np.ndarray]]:
        """(EventBatch, example indices) in order; indices feed :meth:`seen_mask`."""
        for idx in batch_indices(len(self), batch_size):
            yield collate(ds, self.examples, idx), idx


def next_item_eval(ds: ProcessedDataset, window: int, split: str = "test") -> NextItemEval:
    """The :class:`NextItemEval` of ``split`` ("val" or "test"; "train" works too, one row per target)."""
    ex = make_examples(ds, "nextitem", window, split)
    begin = ds.offsets[ex.user]
    counts = ex.target - begin
    seen_offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    rows = np.repeat(begin - seen_offsets[:-1], counts) + np.arange(int(seen_offsets[-1]))
    return NextItemEval(examples=ex, seen_offsets=seen_offsets, seen_items=ds.features["item"][rows])
