"""Readers for the real data formats, each returning the canonical :class:`~userllm.data.events.EventTable`.

``read_events(source, path, **kw)`` dispatches on the source name; the format inside a source (MovieLens
csv / ``::`` / ml-100k, plain or gzipped JSON lines) is detected from the files. Every reader parses the
big files column-wise with pyarrow and raises :class:`~userllm.errors.DataError` naming the file and the
1-based line for missing files, unknown layouts, malformed rows and empty datasets.
"""

from __future__ import annotations

import os

from ...errors import UserError
from ..events import EventTable
from .amazon import read_amazon, read_amazon_meta
from .google_local import read_google_local, read_google_local_meta
from .movielens import detect_movielens_format, read_movielens, read_movielens_tags

READERS = {
    "movielens": read_movielens,
    "amazon": read_amazon,
    "google_local": read_google_local,
}


def read_events(source: str, path: str | os.PathLike, **kw) -> EventTable:
    """Read ``path`` with the reader of ``source`` ("movielens", "amazon" or "google_local").

    Extra keywords go to the reader (``meta_path=`` for amazon / google_local).
    """
    try:
        reader = READERS[source]
    except KeyError:
        raise UserError(f"unknown data source {source!r}; choose one of: {', '.join(READERS)}") from None
    return reader(path, **kw)


__all__ = [
    "READERS",
    "detect_movielens_format",
    "read_amazon",
    "read_amazon_meta",
    "read_events",
    "read_google_local",
    "read_google_local_meta",
    "read_movielens",
    "read_movielens_tags",
]
