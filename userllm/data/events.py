"""The canonical event table every reader produces and every later stage consumes.

Columnar (NumPy arrays of equal length E, one row per event) so that a 20M-row MovieLens file never
becomes 20M Python objects. Users and items are dense indices into ``user_ids`` and ``items``; the
item-level side information (title, categories) lives once per item in :class:`ItemCatalog`, and an
event's categories are its item's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class TextColumn:
    """E optional strings held as one Arrow ``large_string`` column: no per-row Python objects, so a cache
    entry's review file is memory-mapped as is instead of being rebuilt into E ``str`` objects.

    ``col[i]`` is a ``str`` (None where the source had no string); ``take`` / ``filter`` return columns;
    ``to_list`` gives Python strings for a batch. Built from an Arrow array (chunked or not) or any
    sequence of ``str`` / None (a NumPy object array included).
    """

    def __init__(self, values: Any):
        if isinstance(values, TextColumn):
            values = values.arrow
        if not isinstance(values, (pa.Array, pa.ChunkedArray)):
            values = pa.array(list(values) if isinstance(values, np.ndarray) else values, type=pa.large_string())
        elif values.type != pa.large_string():
            values = values.cast(pa.large_string())
        self.arrow = values

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, i: int) -> str | None:
        return self.arrow[int(i)].as_py()

    def __iter__(self) -> Iterator[str | None]:
        return iter(self.arrow.to_pylist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextColumn):
            chunked = lambda a: a if isinstance(a, pa.ChunkedArray) else pa.chunked_array([a])  # noqa: E731
            return chunked(self.arrow).equals(chunked(other.arrow))
        if isinstance(other, (list, tuple)):
            return self.to_list() == list(other)
        return NotImplemented

    def take(self, rows: Any) -> "TextColumn":
        return TextColumn(self.arrow.take(pa.array(np.asarray(rows, dtype=np.int64))))

    def filter(self, keep: np.ndarray) -> "TextColumn":
        return TextColumn(self.arrow.filter(pa.array(np.asarray(keep, dtype=bool))))

    def to_list(self, rows: Any = None) -> list[str | None]:
        return (self.arrow if rows is None else self.take(rows).arrow).to_pylist()

    def nonempty(self) -> np.ndarray:
        """bool [E]: True where the string exists and is not empty."""
        return pc.binary_length(self.arrow).fill_null(0).to_numpy() > 0

    def or_else(self, other: "TextColumn") -> "TextColumn":
        """This column where a row has a non-empty string, else ``other``'s (None where neither has one)."""
        return TextColumn(pc.if_else(pa.array(self.nonempty()), self.arrow, other.arrow))


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
    summary:   :class:`TextColumn` [E] (None when the source has no review summaries); any sequence of
               ``str`` / None given here is converted
    text:      :class:`TextColumn` [E] of review texts, or None
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
    summary: TextColumn | None = None
    text: TextColumn | None = None
    name: str = "events"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user)
        for col in ("item", "timestamp", "rating"):
            if len(getattr(self, col)) != n:
                raise ValueError(f"EventTable column {col!r} has {len(getattr(self, col))} rows, expected {n}")
        for col in ("summary", "text"):
            value = getattr(self, col)
            if value is not None and not isinstance(value, TextColumn):
                value = TextColumn(value)
                setattr(self, col, value)
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
