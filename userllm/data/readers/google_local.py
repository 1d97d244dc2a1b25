"""Google Local Reviews (2021, Li et al. / Yan et al.) reader: JSON-lines reviews plus ``meta-*.json``.

Reviews (plain or ``.gz``): ``user_id`` (string), ``gmap_id`` (item), ``time`` (milliseconds since the
epoch; stored as int64 *seconds*, floor-divided), ``rating`` are required; ``text`` is optional (null for
rating-only reviews; becomes ""). There is no summary. Other keys (``name``, ``pics``, ``resp``) are ignored.

Metadata (``meta-<State>.json[.gz]``, also accepted as ``meta_<State>...``): ``gmap_id``, ``name`` (the
item title), ``category`` (list of strings or null). The files repeat some gmap_ids: the first record wins.

Users and items are numbered in byte-wise sorted raw-id order; events stay in file order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..events import EventTable
from ._common import (JsonField, assemble, build_catalog, factorize, lookup_first, read_jsonl, require_file,
                      require_rows, resolve_review_and_meta, strip_suffixes, text_column)

REVIEW_FIELDS = [
    JsonField("user_id", "str"),
    JsonField("gmap_id", "str"),
    JsonField("time", "int"),
    JsonField("rating", "num"),
    JsonField("text", "str", required=False),
]
META_FIELDS = [
    JsonField("gmap_id", "str"),
    JsonField("name", "str", required=False),
    JsonField("category", "str_list", required=False),
]


def _sibling_meta(review: Path) -> list[str]:
    """``review-South_Dakota_10.json.gz`` -> ``meta-South_Dakota.json.gz`` (and ``meta_``, other suffixes)."""
    state = re.sub(r"^reviews?[-_]", "", strip_suffixes(review.name))
    state = re.sub(r"_\d+$", "", state)
    return [f"{p}{state}{s}" for p in ("meta-", "meta_") for s in (".json.gz", ".json", ".jsonl.gz", ".jsonl")]


def read_google_local_meta_table(path: str | os.PathLike) -> pa.Table:
    """The metadata file as an Arrow table (gmap_id, name, category list<string>), file order, duplicates kept."""
    path = require_file(path, "metadata file")
    table = read_jsonl(path, META_FIELDS)
    require_rows(table.num_rows, path, "metadata records")
    return table


def read_google_local_meta(path: str | os.PathLike) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Item catalogue of a metadata file: ``{gmap_id: (name, categories)}``, first record per gmap_id.

    Ordered by first appearance in the file; a null/empty name becomes the gmap_id, a null category ``()``.
    """
    table = read_google_local_meta_table(path)
    ids = table.column("gmap_id")
    codes, uniques = factorize(ids)
    # First row of each distinct id, in file order.
    first = np.full(len(uniques), len(codes), np.int64)
    np.minimum.at(first, codes, np.arange(len(codes), dtype=np.int64))
    first.sort()
    raw_ids = ids.take(pa.array(first)).to_pylist()
    catalog = build_catalog(np.asarray(raw_ids, dtype=str), first, table.column("name"), table.column("category"))
    return {raw: (title, cats) for raw, title, cats in zip(raw_ids, catalog.titles, catalog.categories)}


def read_google_local(path: str | os.PathLike, meta_path: str | os.PathLike | None = None) -> EventTable:
    """Read Google Local reviews (+ metadata) into an :class:`EventTable`.

    path:      a review file (``.json`` / ``.json.gz``) or a directory with exactly one review file and at
               most one ``meta-*`` / ``meta_*`` file.
    meta_path: the metadata file; when None, the one in the directory, or the ``meta-<State>`` file beside a
               ``review-<State>[_10]`` file, is used if present.
    Returns timestamp int64 seconds, rating float32, text object array of str, summary None;
    ``meta["files"]`` lists the paths of the files read.
    """
    review_path, meta_file = resolve_review_and_meta(path, meta_path, ("meta-", "meta_"), _sibling_meta,
                                                     "Google Local")
    reviews = read_jsonl(review_path, REVIEW_FIELDS)
    require_rows(reviews.num_rows, review_path, "reviews")
    meta = read_google_local_meta_table(meta_file) if meta_file is not None else None

    def catalog_for(uniques: pa.Array, raw_ids: np.ndarray):
        if meta is None:
            return build_catalog(raw_ids, np.full(len(raw_ids), -1, np.int64))
        rows = lookup_first(uniques, meta.column("gmap_id"))
        return build_catalog(raw_ids, rows, meta.column("name"), meta.column("category"))

    files = [str(review_path)] + ([str(meta_file)] if meta_file is not None else [])
    return assemble(
        "google_local",
        reviews.column("user_id"),
        reviews.column("gmap_id"),
        timestamp=np.floor_divide(reviews.column("time").to_numpy(), 1000),
        rating=reviews.column("rating").to_numpy(),
        catalog_for=catalog_for,
        text=text_column(reviews.column("text")),
        meta={"source": "google_local", "path": str(review_path),
              "meta_path": str(meta_file) if meta_file else None, "files": files},
    )
