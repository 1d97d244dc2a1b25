"""Amazon Review Data (2018, Ni et al.) reader: JSON-lines reviews plus optional ``meta_*.json`` metadata.

Reviews (one JSON object per line, plain or ``.gz``): ``reviewerID`` (user), ``asin`` (item), ``overall``
(rating), ``unixReviewTime`` (seconds) are required; ``summary`` and ``reviewText`` are optional (a few
records lack ``reviewText``; a missing value becomes ""). Other keys (``style``, ``vote``, ``image`` ...)
are ignored without being converted.

Metadata (``meta_<Category>.json[.gz]``): ``asin``, ``title``, ``category`` (list of strings). Duplicate
asins keep their first record. Items without metadata (or without a title) are titled by their asin.

Users and items are numbered in byte-wise sorted raw-id order; events stay in file order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..events import EventTable
from ._common import (JsonField, assemble, build_catalog, lookup_first, read_jsonl, require_file, require_rows,
                      resolve_review_and_meta, strip_suffixes, text_column)

REVIEW_FIELDS = [
    JsonField("reviewerID", "str"),
    JsonField("asin", "str"),
    JsonField("overall", "num"),
    JsonField("unixReviewTime", "int"),
    JsonField("summary", "str", required=False),
    JsonField("reviewText", "str", required=False),
]
META_FIELDS = [
    JsonField("asin", "str"),
    JsonField("title", "str", required=False),
    JsonField("category", "str_list", required=False),
]


def _sibling_meta(review: Path) -> list[str]:
    """``AMAZON_FASHION_5.json.gz`` -> ``meta_AMAZON_FASHION.json.gz`` and the other suffixes."""
    category = re.sub(r"_\d+$", "", strip_suffixes(review.name))
    return [f"meta_{category}{suffix}" for suffix in (".json.gz", ".json", ".jsonl.gz", ".jsonl")]


def read_amazon_meta(path: str | os.PathLike) -> pa.Table:
    """The metadata file as an Arrow table with columns asin, title, category (list<string>), file order."""
    path = require_file(path, "metadata file")
    table = read_jsonl(path, META_FIELDS)
    require_rows(table.num_rows, path, "metadata records")
    return table


def read_amazon(path: str | os.PathLike, meta_path: str | os.PathLike | None = None) -> EventTable:
    """Read Amazon 2018 reviews (+ metadata) into an :class:`EventTable`.

    path:      a review file (``.json`` / ``.json.gz``), or a directory holding exactly one review file and
               at most one ``meta_*`` file.
    meta_path: the metadata file; when None, a ``meta_*`` file in the directory, or beside a review file
               the one named after its category (``X_5.json`` -> ``meta_X.json[.gz]``), is used if present.
    Returns rating float32 (``overall``), timestamp int64 seconds, summary/text object arrays of str;
    ``meta["files"]`` lists the paths of the files read.
    """
    review_path, meta_file = resolve_review_and_meta(path, meta_path, ("meta_", "meta-"), _sibling_meta, "Amazon")
    reviews = read_jsonl(review_path, REVIEW_FIELDS)
    require_rows(reviews.num_rows, review_path, "reviews")
    meta = read_amazon_meta(meta_file) if meta_file is not None else None

    def catalog_for(uniques: pa.Array, raw_ids: np.ndarray):
        if meta is None:
            return build_catalog(raw_ids, np.full(len(raw_ids), -1, np.int64))
        rows = lookup_first(uniques, meta.column("asin"))
        return build_catalog(raw_ids, rows, meta.column("title"), meta.column("category"))

    files = [str(review_path)] + ([str(meta_file)] if meta_file is not None else [])
    return assemble(
        "amazon",
        reviews.column("reviewerID"),
        reviews.column("asin"),
        timestamp=reviews.column("unixReviewTime").to_numpy(),
        rating=reviews.column("overall").to_numpy(),
        catalog_for=catalog_for,
        summary=text_column(reviews.column("summary")),
        text=text_column(reviews.column("reviewText")),
        meta={"source": "amazon", "path": str(review_path), "meta_path": str(meta_file) if meta_file else None,
              "files": files},
    )
