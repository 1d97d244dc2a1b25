"""A hand-made ProcessedDataset for the journeys tests: two users, four movies, raw ids as in MovieLens."""

from __future__ import annotations

import numpy as np
import pytest

from userllm.data.dataset import process_events
from userllm.data.events import EventTable, ItemCatalog

DAY = 86400


@pytest.fixture
def tiny_ds():
    """User "1": 6 events over 30 days (items 10, 20 alternating), user "2": 5 events within one hour."""
    items = ItemCatalog(raw_ids=np.array(["10", "20", "30", "40"]),
                        titles=["Alien (1979)", "Heat (1995)", "Up (2009)", "40"],
                        categories=[("Sci-Fi", "Horror"), ("Crime",), ("Animation", "Comedy"), ()])
    user = np.array([0] * 6 + [1] * 5)
    item = np.array([0, 1, 0, 1, 0, 1, 2, 2, 3, 2, 3])
    ts = np.array([0, 5, 10, 15, 20, 30], dtype=np.int64) * DAY
    ts = np.concatenate([ts, 100 * DAY + np.arange(5) * 600]).astype(np.int64)
    ev = EventTable(user=user, item=item, timestamp=ts, rating=np.full(11, 4.0, np.float32),
                    user_ids=np.array(["1", "2"]), items=items, name="movielens")
    return process_events(ev, min_user_events=3)
