"""The canonical event table every reader produces and every later stage consumes.

Columnar (NumPy arrays of equal length E, one row per event) so that a 20M-row MovieLens file never
becomes 20M Python objects. Users and items are dense indices into ``user_ids`` and ``items``; the
item-level side information (title, categories) lives once per item in :class:`ItemCatalog`, and an
event's categories are its item's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ItemCatalog:
    """Side information per item, indexed by the dense item index ``0 .. num_items - 1``.

    raw_ids:    [I] the source's item ids (MovieLens movieId, Amazon asin, Google gmap_id) as ``str``.
    titles:     [I] display title (``str``; the raw id when the source has no title).
    categories: [I] tuple of category/genre names (may be empty).
    """

    raw_ids: np.ndarray
    titles: list[str]
    categories: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.raw_ids)


@dataclass
class EventTable:
    """All events of one dataset, one row per event (E rows), in source order.

    user:      int64 [E]   dense user index into ``user_ids``
    item:      int64 [E]   dense item index into ``items``
    timestamp: int64 [E]   seconds since the epoch (or any monotone clock of the source)
    rating:    float32 [E] the source's rating (NaN when the source has none)
    summary:   object [E] of ``str`` or None when the source has no review summaries
    text:      object [E] of ``str`` or None when the source has no review texts
    user_ids:  [U] the source's user ids as ``str``
    items:     :class:`ItemCatalog` with I entries
    name:      short dataset name, e.g. ``"movielens"``
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray
    user_ids: np.ndarray
    items: ItemCatalog
    summary: np.ndarray | None = None
    text: np.ndarray | None = None
    name: str = "events"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user)
        for col in ("item", "timestamp", "rating"):
            if len(getattr(self, col)) != n:
                raise ValueError(f"EventTable column {col!r} has {len(getattr(self, col))} rows, expected {n}")
        for col in ("summary", "text"):
            value = getattr(self, col)
            if value is not None and len(value) != n:
                raise ValueError(f"EventTable column {col!r} has {len(value)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.items)
