"""Load time of a MovieLens-20M-sized ``ratings.csv`` through :func:`userllm.data.readers.read_movielens`.

A synthetic release in the ml-20m CSV layout (``ratings.csv`` + ``movies.csv``) is generated once per
session with NumPy and written with ``pyarrow.csv.write_csv`` (vectorized: 20M rows take seconds), then
the reader is timed on it and its output checked exactly against the generating arrays.

Size: ``USERLLM_BENCH_ROWS`` rows when set; otherwise 20,000,000 (ml-20m: 20,000,263 ratings of 138,493
users on 26,744 movies), or 50,000 when ``--benchmark-disable`` is given or ``USERLLM_BENCH_SMALL=1``
(the CI smoke run).

    pytest benchmarks/test_data_load.py --benchmark-only            # 20M rows
    USERLLM_BENCH_SMALL=1 pytest benchmarks/test_data_load.py -q    # 50k rows
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from userllm.data.readers import read_movielens

FULL_ROWS = 20_000_000
SMALL_ROWS = 50_000
_GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
           "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War")


def bench_rows(config: pytest.Config) -> int:
    if os.environ.get("USERLLM_BENCH_ROWS"):
        return int(os.environ["USERLLM_BENCH_ROWS"])
    if os.environ.get("USERLLM_BENCH_SMALL") == "1" or config.getoption("benchmark_disable", default=False):
        return SMALL_ROWS
    return FULL_ROWS


@dataclass
class SyntheticRelease:
    """What was written, to check the reader against.

    user/item: int32 [N] dense indices the reader must reproduce (raw ids are ascending in both).
    rating_code: int8 [N], rating = code / 2.  timestamp: int64 [N].
    movie_ids: int64 [I] raw movieIds (ascending); the last one is deliberately absent from movies.csv.
    """

    directory: Path
    user: np.ndarray
    item: np.ndarray
    rating_code: np.ndarray
    timestamp: np.ndarray
    movie_ids: np.ndarray
    num_users: int


def write_synthetic_release(directory: Path, rows: int, seed: int = 0) -> SyntheticRelease:
    """ml-20m-shaped ratings.csv (sorted by user, Zipf item popularity) + movies.csv, all vectorized."""
    rng = np.random.default_rng(seed)
    num_users = max(2, rows // 144)
    num_items = max(5, min(27_000, rows // 700))
    # Every user and every item occurs at least once, so the expected counts are exact.
    user = np.sort(np.concatenate([np.arange(num_users, dtype=np.int32),
                                   rng.integers(0, num_users, rows - num_users, dtype=np.int32)]))
    popularity = 1.0 / (np.arange(num_items) + 10.0) ** 0.9
    item = rng.choice(num_items, size=rows, p=popularity / popularity.sum()).astype(np.int32)
    item[rng.choice(rows, size=num_items, replace=False)] = np.arange(num_items, dtype=np.int32)
    rating_code = rng.integers(1, 11, rows, dtype=np.int8)  # 0.5 .. 5.0 stars
    timestamp = rng.integers(789_652_009, 1_427_784_002, rows, dtype=np.int64)
    movie_ids = np.sort(rng.choice(200_000, size=num_items, replace=False)).astype(np.int64) + 1

    directory.mkdir(parents=True, exist_ok=True)
    star_text = pa.array([f"{c / 2:.1f}" for c in range(11)])  # "4.0", "3.5" as in the real file
    ratings = pa.table({
        "userId": pa.array(user.astype(np.int64) + 1),
        "movieId": pa.array(movie_ids[item]),
        "rating": pa.DictionaryArray.from_arrays(pa.array(rating_code), star_text),
        "timestamp": pa.array(timestamp),
    })
    options = pacsv.WriteOptions(quoting_style="needed")
    pacsv.write_csv(ratings, directory / "ratings.csv", write_options=options)
    del ratings

    # movies.csv: titles with commas (quoted by the writer), multi-genre and "(no genres listed)" rows.
    n_listed = num_items - 1
    titles = [f"Movie {m}, The ({1950 + m % 70})" for m in movie_ids[:n_listed].tolist()]
    picks = rng.random((n_listed, len(_GENRES))) < 0.15
    genres = ["|".join(g for g, on in zip(_GENRES, row) if on) or "(no genres listed)" for row in picks]
    movies = pa.table({"movieId": pa.array(movie_ids[:n_listed]), "title": titles, "genres": genres})
    pacsv.write_csv(movies, directory / "movies.csv", write_options=options)
    return SyntheticRelease(directory, user, item, rating_code, timestamp, movie_ids, num_users)


@pytest.fixture(scope="module")
def release(request, tmp_path_factory) -> SyntheticRelease:
    return write_synthetic_release(tmp_path_factory.mktemp("movielens") / "ml-synthetic",
                                   bench_rows(request.config))


def test_read_movielens_ratings_csv(benchmark, release):
    rows = len(release.user)
    rounds = 1 if rows > 1_000_000 else 3
    events = benchmark.pedantic(read_movielens, args=(release.directory,), rounds=rounds, iterations=1)
    benchmark.extra_info["rows"] = rows

    assert len(events) == rows
    assert events.num_users == release.num_users
    assert events.num_items == len(release.movie_ids)
    # Dense ids follow ascending raw ids, and the generator's raw ids ascend with its indices.
    np.testing.assert_array_equal(events.user, release.user)
    np.testing.assert_array_equal(events.item, release.item)
    np.testing.assert_array_equal(events.rating, release.rating_code.astype(np.float32) / 2)
    np.testing.assert_array_equal(events.timestamp, release.timestamp)
    assert events.user.dtype == np.int64 and events.timestamp.dtype == np.int64
    assert events.rating.dtype == np.float32
    assert events.user_ids[0] == "1" and events.user_ids[-1] == str(release.num_users)
    first = release.movie_ids[0]
    assert events.items.titles[0] == f"Movie {first}, The ({1950 + first % 70})"
    # The movie missing from movies.csv falls back to its id, without genres.
    assert events.items.titles[-1] == str(release.movie_ids[-1]) and events.items.categories[-1] == ()
