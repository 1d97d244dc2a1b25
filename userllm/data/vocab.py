"""Per-feature vocabularies: raw values (item ids, ratings, category names) <-> dense embedding ids.

Id layout, shared by every feature and relied on by the kernels:

* ``PAD_ID = -1``: padding. Never a table row; ``embedding_concat`` treats any id < 0 as "no value".
* ``UNK_ID = 0``: anything not in the vocabulary (rare values under ``min_count``, missing ratings).
* ``1 .. len(vocab) - 1``: the real tokens. ``len(vocab)`` is the number of embedding-table rows.

Tokens are stored as strings (so a vocabulary is plain JSON); :func:`token_key` maps a raw value to its
token: strings as they are, integers in decimal, floats in shortest ``%g`` form (``4.0 -> "4"``,
``4.5 -> "4.5"``), and ``None``/NaN to no token at all (they encode to ``UNK_ID``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

PAD_ID = -1
UNK_ID = 0
UNK_TOKEN = "<unk>"
ORDERS = ("frequency", "sorted", "given")


def token_key(value: Any) -> str | None:
    """The token string of one raw value, or None for a missing value (None / NaN)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        return format(value, "g") if value != int(value) or abs(value) >= 1e16 else str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _unique_counts(values: np.ndarray) -> tuple[list[Any], np.ndarray]:
    """Distinct non-missing values (in sorted order where the dtype sorts) and their counts."""
    flat = np.asarray(values).ravel()
    if flat.dtype.kind == "f":
        flat = flat[~np.isnan(flat)]
    if flat.dtype.kind in "biufUS":
        uniq, counts = np.unique(flat, return_counts=True)
        return uniq.tolist(), counts.astype(np.int64)
    # object arrays (str mixed with None): count in Python over the values, sort by key below.
    counter = Counter(v for v in flat.tolist() if token_key(v) is not None)
    keys = sorted(counter, key=token_key)
    return keys, np.array([counter[k] for k in keys], dtype=np.int64)


class Vocabulary:
    """A mapping between raw values and ids ``0 .. len - 1`` (``0`` = unknown, see the module docstring).

    Build with :meth:`build`; encode NumPy arrays of any shape with :meth:`encode` (vectorized: Python
    work is proportional to the number of *distinct* values, not the number of events).
    """

    PAD_ID = PAD_ID
    UNK_ID = UNK_ID
    UNK_TOKEN = UNK_TOKEN

    def __init__(self, tokens: Sequence[str], name: str = "", counts: Sequence[int] | None = None):
        """``tokens``: the real tokens in id order (id 1 first); ``<unk>`` is added in front."""
        tokens = [str(t) for t in tokens]
        if len(set(tokens)) != len(tokens):
            dup = next(t for t, c in Counter(tokens).items() if c > 1)
            raise ValueError(f"Vocabulary {name!r}: duplicate token {dup!r}")
        if UNK_TOKEN in tokens:
            raise ValueError(f"Vocabulary {name!r}: {UNK_TOKEN!r} is reserved")
        self.name = name
        self._tokens: list[str] = [UNK_TOKEN] + tokens
        self._index: dict[str, int] = {t: i for i, t in enumerate(self._tokens)}
        del self._index[UNK_TOKEN]  # a literal "<unk>" value is unknown, not a token
        self.counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        if self.counts is not None and len(self.counts) != len(tokens):
            raise ValueError(f"Vocabulary {name!r}: {len(self.counts)} counts for {len(tokens)} tokens")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, values: Iterable[Any] | np.ndarray, *, min_count: int = 1, order: str = "frequency",
              name: str = "") -> "Vocabulary":
        """Vocabulary of the distinct values in ``values`` seen at least ``min_count`` times.

        order: "frequency" (most frequent first, ties by the token string: popular values get small
        ids) or "sorted" (ascending by value, e.g. ratings 0.5 < 1 < 1.5 ...) or "given" (first
        occurrence order; ``values`` should then be distinct).
        Missing values (None, NaN) are not tokens.
        """
        if order not in ORDERS:
            raise ValueError(f"Vocabulary.build: order must be one of {ORDERS}, got {order!r}")
        if min_count < 1:
            raise ValueError(f"Vocabulary.build: min_count must be >= 1, got {min_count}")
        arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
        if order == "given":
            seen: dict[str, int] = {}
            for v in arr.ravel().tolist():
                k = token_key(v)
                if k is not None:
                    seen[k] = seen.get(k, 0) + 1
            keys, counts = list(seen), np.array(list(seen.values()), dtype=np.int64)
        else:
            raw, counts = _unique_counts(arr)
            keys = [token_key(v) for v in raw]
            # Distinct raw values can share a key (1 and 1.0 in an object column): merge them.
            if len(set(keys)) != len(keys):
                merged: dict[str, int] = {}
                for k, c in zip(keys, counts.tolist()):
                    merged[k] = merged.get(k, 0) + c
                keys, counts = list(merged), np.array(list(merged.values()), dtype=np.int64)
        keep = counts >= min_count
        keys = [k for k, m in zip(keys, keep) if m]
        counts = counts[keep]
        if order == "frequency":
            perm = sorted(range(len(keys)), key=lambda i: (-int(counts[i]), keys[i]))
            keys, counts = [keys[i] for i in perm], counts[perm]
        return cls(keys, name=name, counts=counts)

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, value: Any) -> bool:
        return token_key(value) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._tokens == other._tokens and self.name == other.name

    def __repr__(self) -> str:
        return f"Vocabulary(name={self.name!r}, size={len(self)})"

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order, ``tokens[0] == "<unk>"``."""
        return list(self._tokens)

    def id(self, value: Any) -> int:
        """The id of one raw value (``UNK_ID`` when unknown or missing)."""
        return self._index.get(token_key(value), UNK_ID)

    def token(self, idx: int) -> str | None:
        """The token string of one id; None for padding (< 0)."""
        if idx < 0:
            return None
        return self._tokens[idx]

    def encode(self, values: Any) -> np.ndarray:
        """Ids (int64, same shape as ``values``) of an array of raw values; unknown/missing -> ``UNK_ID``."""
        arr = np.asarray(values)
        out_shape = arr.shape
        flat = arr.ravel()
        if flat.size == 0:
            return np.zeros(out_shape, dtype=np.int64)
        if flat.dtype.kind in "biufUS":
            # np.unique collapses NaNs into one value, whose key is None -> UNK_ID.
            uniq, inverse = np.unique(flat, return_inverse=True)
            table = np.fromiter((self._index.get(token_key(v), UNK_ID) for v in uniq.tolist()),
                                dtype=np.int64, count=len(uniq))
            ids = table[inverse.ravel()]
        else:
            ids = np.fromiter((self._index.get(token_key(v), UNK_ID) for v in flat.tolist()),
                              dtype=np.int64, count=flat.size)
        return ids.reshape(out_shape)

    def decode(self, ids: Any) -> list:
        """Tokens of an id array (nested lists for 2-D input); padding ids give None."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim == 0:
            return self.token(int(arr))
        if arr.size and int(arr.max()) >= len(self):
            raise IndexError(f"Vocabulary {self.name!r}: id {int(arr.max())} out of range ({len(self)} ids)")
        tokens = np.array(self._tokens + [None], dtype=object)
        return tokens[np.where(arr < 0, len(self._tokens), arr)].tolist()

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {"name": self.name, "tokens": self._tokens[1:],
                "counts": None if self.counts is None else self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["tokens"], name=d.get("name", ""), counts=d.get("counts"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        return cls.from_dict(json.loads(text))


def rating_vocabulary(ratings: np.ndarray, name: str = "rating") -> Vocabulary:
    """Vocabulary of the distinct rating values in ascending order (NaN, i.e. "no rating", is UNK)."""
    return Vocabulary.build(np.asarray(ratings, dtype=np.float64), order="sorted", name=name)
