"""Generate a MovieLens-20M-shaped release (``ratings.csv`` + ``movies.csv`` in the ml-20m CSV layout).

    python benchmarks/make_ml20m.py OUT_DIR                  # 20,000,263 ratings, like ml-20m (~40 s, 560 MB)
    USERLLM_ML20M_RATINGS=20000 python benchmarks/make_ml20m.py OUT_DIR   # a tiny one (CI)
    python benchmarks/make_ml20m.py OUT_DIR --ratings 2000000

Shape (ml-20m: 20,000,263 ratings by 138,493 users of 26,744 movies, every user >= 20 ratings, median
user ~68, 20 genre names): users = ratings / 144.4 (ml-20m's mean), each with 20 + a log-normal number
of ratings (median ~77, long tail, capped at 9,254 = ml-20m's most active user) rescaled to the exact
total; movies = min(26,744, ratings / 748) with Zipf(0.9) popularity; half-star ratings; timestamps
increasing within each user between 1995 and 2015 (ml-20m's span). The number of training windows at
a given stride therefore follows ml-20m's user-length distribution closely, not exactly.

Nothing here is real data, and generated files never belong in the repository. Deterministic per seed;
NumPy and Arrow only (vectorised: no per-row Python).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ML20M_RATINGS = 20_000_263
ML20M_USERS = 138_493
ML20M_MOVIES = 26_744
MIN_USER_RATINGS = 20
MAX_USER_RATINGS = 9_254
ENV = "USERLLM_ML20M_RATINGS"
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
T_START, T_END = 789_652_009, 1_427_784_002      # ml-20m's first and last timestamps (1995-01-09, 2015-03-31)


def default_ratings() -> int:
    """``$USERLLM_ML20M_RATINGS`` when set, else ml-20m's 20,000,263."""
    value = os.environ.get(ENV)
    if value is None:
        return ML20M_RATINGS
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"${ENV} must be an integer number of ratings, got {value!r}") from None
    return n


def user_lengths(rng: np.random.Generator, ratings: int) -> np.ndarray:
    """int64 [U]: ratings per user, each in [20, 9254], summing to exactly ``ratings``."""
    users = max(1, round(ratings * ML20M_USERS / ML20M_RATINGS))
    if ratings < MIN_USER_RATINGS * users:
        raise ValueError(f"{ratings} ratings cannot give {users} users >= {MIN_USER_RATINGS} ratings each")
    extra = rng.lognormal(mean=4.04, sigma=1.25, size=users)         # median e^4.04 = 57 above the minimum
    extra *= (ratings - MIN_USER_RATINGS * users) / extra.sum()
    n = np.minimum(MIN_USER_RATINGS + np.floor(extra).astype(np.int64), MAX_USER_RATINGS)
    short = ratings - int(n.sum())                                    # rounding (and the cap): spread it out
    while short:
        room = np.flatnonzero(n < MAX_USER_RATINGS) if short > 0 else np.flatnonzero(n > MIN_USER_RATINGS)
        pick = rng.choice(room, size=min(abs(short), len(room)), replace=False)
        n[pick] += np.sign(short)
        short = ratings - int(n.sum())
    return n


def write_release(directory: str | os.PathLike, ratings: int | None = None, seed: int = 0) -> dict:
    """Write ``ratings.csv`` and ``movies.csv`` into ``directory``; returns the shape written
    ({"ratings", "users", "movies", "seconds"})."""
    t0 = time.time()
    ratings = default_ratings() if ratings is None else ratings
    if ratings < MIN_USER_RATINGS:
        raise ValueError(f"ratings must be >= {MIN_USER_RATINGS}, got {ratings}")
    rng = np.random.default_rng(seed)
    lengths = user_lengths(rng, ratings)
    users = len(lengths)
    movies = max(5, min(ML20M_MOVIES, ratings // 748))
    user = np.repeat(np.arange(1, users + 1, dtype=np.int64), lengths)

    popularity = 1.0 / (np.arange(movies) + 10.0) ** 0.9
    item = rng.choice(movies, size=ratings, p=popularity / popularity.sum())
    item[rng.choice(ratings, size=movies, replace=False)] = np.arange(movies)   # every movie rated at least once
    movie_ids = np.sort(rng.choice(131_262, size=movies, replace=False)) + 1      # ml-20m's movieId range
    rating_code = rng.integers(1, 11, size=ratings, dtype=np.int8)                # 0.5 .. 5.0 stars

    # Increasing times per user: a start in the span, then exponential gaps, one cumulative sum over all rows
    # restarted at each user's first row.
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    gaps = rng.exponential(3 * 86400.0, size=ratings).astype(np.int64)
    gaps[first] = rng.integers(T_START, T_END - 5 * 365 * 86400, size=users)
    csum = np.cumsum(gaps)
    timestamp = np.minimum(csum - np.repeat(csum[first] - gaps[first], lengths), T_END)

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    star_text = pa.array([f"{c / 2:.1f}" for c in range(11)])
    table = pa.table({"userId": pa.array(user), "movieId": pa.array(movie_ids[item]),
                      "rating": pa.DictionaryArray.from_arrays(pa.array(rating_code), star_text),
                      "timestamp": pa.array(timestamp)})
    options = pacsv.WriteOptions(quoting_style="needed")
    pacsv.write_csv(table, out / "ratings.csv", write_options=options)
    del table

    picks = rng.random((movies, len(GENRES))) < 0.12
    picks[np.arange(movies), rng.integers(0, len(GENRES), movies)] |= rng.random(movies) < 0.97
    names = np.array(GENRES, dtype=object)
    genres = ["|".join(names[row]) or "(no genres listed)" for row in picks]   # one string per movie (27k)
    titles = [f"Movie {m} ({1915 + m % 100})" for m in movie_ids.tolist()]
    pacsv.write_csv(pa.table({"movieId": pa.array(movie_ids), "title": titles, "genres": genres}),
                    out / "movies.csv", write_options=options)
    return {"ratings": ratings, "users": users, "movies": movies, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="release directory to write (ratings.csv, movies.csv)")
    parser.add_argument("--ratings", type=int, default=None, help=f"ratings (default ${ENV} or {ML20M_RATINGS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        shape = write_release(args.out, args.ratings, args.seed)
    except ValueError as exc:
        print(f"make_ml20m.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {shape['ratings']} ratings, {shape['users']} users, {shape['movies']} movies "
          f"({shape['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
