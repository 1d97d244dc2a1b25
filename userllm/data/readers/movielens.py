"""MovieLens reader: every release layout, detected from the files in the release directory.

=========== ============================== ================================================================
format      releases                       files
=========== ============================== ================================================================
``csv``     ml-latest(-small), ml-20m,     ``ratings.csv`` (``userId,movieId,rating,timestamp``) and
            ml-25m, ml-32m                 ``movies.csv`` (``movieId,title,genres``; quoted titles with commas;
                                           CRLF in ml-latest-small); UTF-8
``dat``     ml-1m, ml-10m                  ``ratings.dat`` / ``movies.dat`` with ``::`` separators
                                           (``UserID::MovieID::Rating::Timestamp``, ``MovieID::Title::Genres``);
                                           latin-1 in ml-1m
``100k``    ml-100k                        ``u.data`` (tab-separated ``user item rating timestamp``), ``u.item``
                                           (``|``-separated, latin-1, 19 genre flag columns), ``u.genre``
=========== ============================== ================================================================

Genres are split on ``|``; the placeholders ``(no genres listed)`` (csv) and ``unknown`` (ml-100k's first
genre flag) give an empty tuple. Titles are MovieLens' title strings (with the year). Movies rated but
absent from the movie file are titled by their id with no genres; movies never rated are left out of the
catalogue. Users and items are numbered in ascending numeric id order (see :mod:`._common`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...errors import DataError
from ..events import EventTable
from ._common import (CsvSpec, assemble, build_catalog, lookup_first, read_delimited, read_small_text_bytes,
                      require_dir_or_file, require_rows)

#: ml-100k's genre order (the flag columns of u.item), used when the release has no u.genre.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
#: Genre names meaning "no genre": dropped from the category tuples.
NO_GENRE = frozenset({"(no genres listed)", "unknown"})

_RATINGS = [("userId", pa.int64()), ("movieId", pa.int64()), ("rating", pa.float32()), ("timestamp", pa.int64())]
_MOVIES = [("movieId", pa.int64()), ("title", pa.string()), ("genres", pa.string())]
_TAGS = [("userId", pa.int64()), ("movieId", pa.int64()), ("tag", pa.string()), ("timestamp", pa.int64())]
# A byte that never occurs in MovieLens text: "::" is rewritten to it so pyarrow can split the .dat files.
_SEP = "\x1f"

#: format name -> the ratings file whose presence identifies it (checked in this order).
FORMATS = {"csv": "ratings.csv", "dat": "ratings.dat", "100k": "u.data"}


def detect_movielens_format(path: str | os.PathLike) -> tuple[str, Path]:
    """(format, release directory) for a release directory (or a file inside one)."""
    path = require_dir_or_file(path)
    directory = path if path.is_dir() else path.parent
    for fmt, ratings in FORMATS.items():
        if (directory / ratings).is_file():
            return fmt, directory
    raise DataError(
        "not a MovieLens release: expected one of " + ", ".join(FORMATS.values()) + " in this directory",
        directory,
    )


def read_movielens(path: str | os.PathLike) -> EventTable:
    """Read a MovieLens release directory into an :class:`EventTable`.

    path: the release directory (``ml-latest-small/``, ``ml-1m/``, ``ml-100k/`` ...) or a file inside it.
    Returns events in file order with user/item = dense indices (ascending raw id), timestamp int64 seconds,
    rating float32, no summary/text. ``meta``: source, format, path (the release directory) and files (the
    paths of every file read, e.g. for cache keys).
    Raises DataError (file, line) for a missing/unknown layout, malformed rows or an empty ratings file.
    """
    fmt, directory = detect_movielens_format(path)
    ratings_path = directory / FORMATS[fmt]
    if fmt == "csv":
        ratings = read_delimited(ratings_path, CsvSpec(_RATINGS, header=True))
    elif fmt == "dat":
        ratings = read_delimited(ratings_path, CsvSpec(_RATINGS, delimiter=_SEP, quoting=False),
                                 data=_dat_bytes(ratings_path, small=False))
    else:
        ratings = read_delimited(ratings_path, CsvSpec(_RATINGS, delimiter="\t", quoting=False))
    require_rows(ratings.num_rows, ratings_path, "ratings")

    movies, movies_path = _read_movies(fmt, directory)
    files = [str(ratings_path)] + ([str(movies_path)] if movies_path is not None else [])
    if fmt == "100k" and (directory / "u.genre").is_file():
        files.append(str(directory / "u.genre"))

    def catalog_for(uniques: pa.Array, raw_ids: np.ndarray):
        if movies is None:
            return build_catalog(raw_ids, np.full(len(raw_ids), -1, np.int64))
        rows = lookup_first(uniques, movies.column("movieId"))
        return build_catalog(raw_ids, rows, movies.column("title"), movies.column("genres"),
                             ignore_categories=NO_GENRE)

    return assemble(
        "movielens",
        ratings.column("userId"),
        ratings.column("movieId"),
        timestamp=ratings.column("timestamp").to_numpy(),
        rating=ratings.column("rating").to_numpy(),
        catalog_for=catalog_for,
        meta={"source": "movielens", "format": fmt, "path": str(directory), "files": files},
    )


def read_movielens_tags(path: str | os.PathLike) -> pa.Table | None:
    """The release's tag applications (``tags.csv``, or ``tags.dat`` in ml-10m), else None (ml-1m, ml-100k).

    Returns an Arrow table with columns userId int64, movieId int64 (the raw MovieLens ids, as in
    ``ratings``), tag string (stripped; empty tags dropped), timestamp int64, in file order. Not part of
    :func:`read_movielens`: only the journeys' name references use tags (``userllm.journeys``).
    Raises DataError (file, line) for malformed rows.
    """
    fmt, directory = detect_movielens_format(path)
    if fmt == "csv" and (directory / "tags.csv").is_file():
        tags_path = directory / "tags.csv"
        table = read_delimited(tags_path, CsvSpec(_TAGS, header=True), data=read_small_text_bytes(tags_path))
    elif fmt == "dat" and (directory / "tags.dat").is_file():
        tags_path = directory / "tags.dat"
        table = read_delimited(tags_path, CsvSpec(_TAGS, delimiter=_SEP, quoting=False),
                               data=_dat_bytes(tags_path, small=True))
    else:
        return None
    tag = pc.utf8_trim_whitespace(table.column("tag"))
    return table.set_column(2, "tag", tag).filter(pc.not_equal(tag, ""))


def _dat_bytes(path: Path, small: bool) -> bytes:
    """The file with ``::`` rewritten to one separator byte (and transcoded to UTF-8 when ``small``)."""
    if small:
        data = read_small_text_bytes(path)
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    return data.replace(b"::", _SEP.encode())


def _read_movies(fmt: str, directory: Path) -> tuple[pa.Table | None, Path | None]:
    """Movie table with columns movieId int64, title string, genres list<string>; (None, None) if absent."""
    if fmt == "100k":
        return _read_100k_items(directory)
    name = "movies.csv" if fmt == "csv" else "movies.dat"
    path = directory / name
    if not path.is_file():
        return None, None  # ratings alone still make a dataset: titles fall back to the ids
    if fmt == "csv":
        table = read_delimited(path, CsvSpec(_MOVIES, header=True), data=read_small_text_bytes(path))
    else:
        table = read_delimited(path, CsvSpec(_MOVIES, delimiter=_SEP, quoting=False),
                               data=_dat_bytes(path, small=True))
    genres = pc.split_pattern(table.column("genres"), "|")
    return table.set_column(2, "genres", genres), path


def _read_100k_items(directory: Path) -> tuple[pa.Table | None, Path | None]:
    path = directory / "u.item"
    if not path.is_file():
        return None, None
    genres = _read_100k_genres(directory)
    columns = [("movieId", pa.int64()), ("title", pa.string()), ("release", pa.string()),
               ("video_release", pa.string()), ("url", pa.string())]
    columns += [(f"g{i}", pa.int8()) for i in range(len(genres))]
    table = read_delimited(path, CsvSpec(columns, delimiter="|", quoting=False), data=read_small_text_bytes(path))
    # One row per movie (1,682 in ml-100k): a tiny loop turns the flag matrix into genre lists.
    flags = np.zeros((len(table), len(genres)), np.int8)
    for j in range(len(genres)):
        flags[:, j] = table.column(f"g{j}").to_numpy()
    lists = [[genres[j] for j in np.flatnonzero(row)] for row in flags]
    out = pa.table({
        "movieId": table.column("movieId"),
        "title": table.column("title"),
        "genres": pa.array(lists, pa.list_(pa.string())),
    })
    return out, path


def _read_100k_genres(directory: Path) -> tuple[str, ...]:
    """Genre names by flag position from ``u.genre`` (``name|index`` lines), else the standard list."""
    path = directory / "u.genre"
    if not path.is_file():
        return ML100K_GENRES
    names: dict[int, str] = {}
    for line_no, line in enumerate(read_small_text_bytes(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, index = line.rpartition("|")
        if not sep or not index.strip().isdigit():
            raise DataError(f"expected 'genre|index', got {line!r}", path, line_no)
        names[int(index)] = name
    if sorted(names) != list(range(len(names))) or not names:
        raise DataError(f"genre indices must be 0..n-1, got {sorted(names)}", path)
    return tuple(names[i] for i in range(len(names)))
