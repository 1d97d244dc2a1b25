"""Names from the data: tag support, the tagger filter, the category and title fallbacks, and the
one-line error for a dataset with nothing to name journeys from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from userllm.data.dataset import process_events
from userllm.data.events import EventTable, ItemCatalog
from userllm.errors import UserError
from userllm.journeys.references import LabelSource, split_labels


def _vocab_ids(ds, raw):
    raw_ids = np.asarray(ds.events.items.raw_ids).astype(str).tolist()
    return np.array([int(np.flatnonzero(ds.item_index == raw_ids.index(r))[0]) for r in raw])


def test_tags_then_categories_then_titles(tiny_ds):
    ds = tiny_ds
    tags = pa.table({"userId": [1, 2, 2, 2, 99], "movieId": [10, 10, 20, 20, 20],
                     "tag": ["Dark", "dark", "dark", "Heist  movie", "dark"]})
    src = LabelSource(ds, tags)
    assert src.num_tag_rows == 5
    alien, heat, up, forty = _vocab_ids(ds, ["10", "20", "30", "40"])
    # "dark" is on both movies (support 2); "heist movie" on one only.
    assert src.name(np.array([alien, heat, heat]), 2) == ("dark, heist movie", "tags")
    # Only user "1" (dense 0) counts: "dark" is then on one movie: below the support, genres instead.
    only_first = np.array([True, False])
    assert src.name(np.array([alien, heat]), 3, only_first) == ("crime, horror, sci-fi", "categories")
    # Categories ranked by support (Animation and Comedy on item 30 twice), then alphabetical.
    assert src.name(np.array([up, up, forty]), 1) == ("animation", "categories")
    # Item "40" has no category: its title (here the raw id) names it.
    assert src.name(np.array([forty, forty]), 3) == ("40", "titles")


def test_nothing_to_name_from():
    items = ItemCatalog(raw_ids=np.array(["a", "b"]), titles=["a", "b"], categories=[(), ()])
    ev = EventTable(user=np.zeros(4, np.int64), item=np.array([0, 1, 0, 1]), timestamp=np.arange(4),
                    rating=np.full(4, np.nan, np.float32), user_ids=np.array(["u"]), items=items, name="amazon")
    with pytest.raises(UserError, match="no tags, categories or titles"):
        LabelSource(process_events(ev, min_user_events=3))


def test_split_labels():
    assert split_labels(" Sci-Fi,  dark   comedy,,") == ["sci-fi", "dark comedy"]


def test_distinct_labels():
    from userllm.journeys.references import distinct_labels

    assert distinct_labels("Comedy, comedy,  drama, comedy") == "comedy, drama"
    assert distinct_labels("") == ""
