"""Journey names from the data: the supervision, the held-out references and the non-LLM baseline.

A name is the journey's ``k`` most supported labels, lower-cased and joined by ", " (e.g. "sci-fi,
dystopia, atmospheric"). A label's support is the number of the journey's distinct items that carry it
(ties: more applications, then alphabetical). Labels come from, in this order:

1. **tags** (MovieLens ``tags.csv``): the tags users applied to the journey's movies, when at least one
   tag is on >= :data:`MIN_TAG_SUPPORT` of them (a tag on a single movie does not describe a journey);
2. **categories** (MovieLens genres, Amazon categories, synthetic categories) otherwise;
3. **titles** (the journey's items' titles) when its items have no category either.

Which tag applications count is what separates the three uses (``taggers``): the held-out test
references use every tag; the training supervision and the non-LLM baseline ("the journey's most
frequent tags/genres") use only the tags applied by training users, so no test user's own tags reach
anything that is trained or looked up.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..errors import UserError

MIN_TAG_SUPPORT = 2
NAME_SEP = ", "


def normalize_label(text: str) -> str:
    return " ".join(str(text).lower().split())


class LabelSource:
    """Per item vocab id: its tags (with the applying dense user), categories and title.

    ds: the ProcessedDataset; tags: an Arrow table (userId, movieId, tag, ...) of raw MovieLens ids from
    :func:`~userllm.data.readers.read_movielens_tags`, or None.
    """

    def __init__(self, ds, tags=None):
        self.ds = ds
        V = ds.num_items
        self.titles = [normalize_label(t) for t in ds.item_titles(np.arange(V))]
        self.categories = [[normalize_label(c) for c in row] for row in ds.category_names(ds.item_categories)]
        # tag applications per item: list of (dense user, label)
        self.tags: list[list[tuple[int, str]]] = [[] for _ in range(V)]
        self.num_tag_rows = 0
        if tags is not None:
            catalog_to_vocab = np.full(len(ds.events.items), -1, dtype=np.int64)
            valid = ds.item_index >= 0
            catalog_to_vocab[ds.item_index[valid]] = np.flatnonzero(valid)
            raw_item = {raw: i for i, raw in enumerate(np.asarray(ds.events.items.raw_ids).astype(str).tolist())}
            raw_user = {raw: u for u, raw in enumerate(np.asarray(ds.events.user_ids).astype(str).tolist())}
            for user, movie, tag in zip(tags.column("userId").to_pylist(), tags.column("movieId").to_pylist(),
                                        tags.column("tag").to_pylist()):
                cat = raw_item.get(str(movie))
                if cat is None or catalog_to_vocab[cat] < 0:
                    continue                      # a tag on a movie nobody (kept) rated
                self.tags[catalog_to_vocab[cat]].append((raw_user.get(str(user), -1), normalize_label(tag)))
                self.num_tag_rows += 1
        if self.num_tag_rows == 0 and not any(self.categories[1:]) and not _real_titles(ds):
            raise UserError(f"dataset {ds.name!r}: its items have no tags, categories or titles to name journeys "
                            f"from")

    def name(self, items: np.ndarray, k: int, taggers: np.ndarray | None = None) -> tuple[str, str]:
        """(name, source) of a journey with item vocab ids ``items``; source = "tags" | "categories" | "titles".

        taggers: bool [U] of the dense users whose tags count (None = every tag).
        """
        distinct = list(dict.fromkeys(int(i) for i in items))
        support: Counter = Counter()
        uses: Counter = Counter()
        for i in distinct:
            labels = [t for u, t in self.tags[i] if taggers is None or (u >= 0 and taggers[u])]
            uses.update(labels)
            support.update(set(labels))
        if support and max(support.values()) >= MIN_TAG_SUPPORT:
            return _top(support, uses, k), "tags"
        cats = Counter(c for i in distinct for c in self.categories[i])
        if cats:
            return _top(cats, cats, k), "categories"
        return _top(Counter(self.titles[i] for i in items), Counter(), k), "titles"


def _real_titles(ds) -> bool:
    """Whether any title is more than the raw id (sources without titles fall back to the id)."""
    raw = np.asarray(ds.events.items.raw_ids).astype(str)
    return any(t != r for t, r in zip(ds.events.items.titles, raw))


def _top(support: Counter, uses: Counter, k: int) -> str:
    ranked = sorted(support, key=lambda t: (-support[t], -uses[t], t))
    return NAME_SEP.join(ranked[:k])


def split_labels(name: str) -> list[str]:
    """The labels of a name (generated or reference), normalized, empty ones dropped."""
    return [t for t in (normalize_label(p) for p in name.split(",")) if t]


def distinct_labels(name: str) -> str:
    """A name with its repeated labels dropped ("comedy, comedy, drama" -> "comedy, drama"), normalized."""
    return NAME_SEP.join(dict.fromkeys(split_labels(name)))
