"""Shared machinery of the readers: columnar parsing with pyarrow, error location, dense factorization.

The fast path never loops over events in Python: pyarrow parses CSV / JSON lines in C++ (multi-threaded)
and the id columns are factorized with a presence table (dense integer ids) or pyarrow's hash kernels.
Python loops happen only

* over the *item catalogue* (one entry per distinct item: titles and category tuples are Python objects
  in :class:`~userllm.data.events.ItemCatalog` anyway), and
* on the *error path*: pyarrow's messages name neither the file nor the line, so when it rejects a file we
  re-parse it in pieces that end at line breaks and scan only the first rejected piece line by line with
  the standard library, reporting the first offending 1-based line.

Dense ids: users and items are numbered in **sorted raw-id order** (numeric order for MovieLens' integer
ids, byte-wise lexicographic order for string ids such as asins and gmap_ids), so the numbering does not
depend on the order of the lines in the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from ...errors import DataError
from ..events import EventTable, ItemCatalog, TextColumn

# ---------------------------------------------------------------------------------------------- files


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path, or DataError when it does not exist or is not a regular file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found", path)
    if not path.is_file():
        raise DataError(f"expected a {what}, found a directory", path)
    return path


def require_dir_or_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path)
    return path


def is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


def open_binary(path: Path):
    """Open ``path`` for reading bytes, decompressing ``.gz`` transparently."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def read_small_text_bytes(path: Path) -> bytes:
    """The file as UTF-8 bytes: kept as is when it already is UTF-8, else decoded as latin-1.

    For the small side files only (movies, items, metadata of old MovieLens releases): ml-1m / ml-100k are
    latin-1, newer releases UTF-8; every byte string is valid latin-1, so this never fails.
    """
    with open_binary(path) as fh:
        data = fh.read()
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("latin-1").encode("utf-8")


def strip_suffixes(name: str, suffixes=(".gz", ".json", ".jsonl")) -> str:
    changed = True
    while changed:
        changed = False
        for s in suffixes:
            if name.endswith(s):
                name, changed = name[: -len(s)], True
    return name


# ----------------------------------------------------------------------------------- value checking

# What pyarrow accepts for integer / float columns (the error-path locator must agree with it).
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|nan|NaN|inf|Inf)")


def _short(text: str, limit: int = 80) -> str:
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- CSV


@dataclass
class CsvSpec:
    """How to parse one delimited file.

    columns:   (name, arrow type) of every column in file order when the file has no header, or of the
               columns to keep (looked up by name in the header) when ``header`` is True.
    header:    whether line 1 names the columns.
    delimiter: single-character delimiter (after any ``::`` -> delimiter rewrite).
    quoting:   whether ``"`` quotes fields (True for MovieLens CSV; False for ``::``/pipe files, whose titles
               contain bare quotes).
    """

    columns: list[tuple[str, pa.DataType]]
    header: bool = False
    delimiter: str = ","
    quoting: bool = True


def read_delimited(path: Path, spec: CsvSpec, data: bytes | None = None) -> pa.Table:
    """Parse a delimited file into an Arrow table with exactly ``spec.columns``.

    ``data`` (already-transformed bytes, e.g. ``::`` rewritten) replaces reading ``path``; ``path`` still
    names the file in errors. Every failure becomes a DataError naming the file and the 1-based line.
    """
    names = [n for n, _ in spec.columns]
    types = dict(spec.columns)
    source = pa.BufferReader(data) if data is not None else str(path)
    if spec.header:
        header = _first_line(path, data)
        if not header.strip():
            raise DataError("empty file (expected a header line)", path, 1)
        got = _split_header(header, spec)
        missing = [n for n in names if n not in got]
        if missing:
            raise DataError(
                f"expected a header naming columns {', '.join(names)}; got {_short(header)!r} "
                f"(missing {', '.join(missing)})",
                path,
                1,
            )
        read_options = pacsv.ReadOptions(block_size=4 << 20)
        include = names
    else:
        read_options = pacsv.ReadOptions(column_names=names, block_size=4 << 20)
        include = None
    parse_options = pacsv.ParseOptions(delimiter=spec.delimiter, quote_char='"' if spec.quoting else False)
    # No null markers: an empty or "NA" id / rating is malformed, not missing.
    convert_options = pacsv.ConvertOptions(
        column_types=types,
        include_columns=include,
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        table = pacsv.read_csv(source, read_options=read_options, parse_options=parse_options,
                               convert_options=convert_options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, EOFError) as exc:
        raise _csv_error(path, data, spec, exc) from None
    return table.select(names)


def _first_line(path: Path, data: bytes | None) -> str:
    if data is not None:
        end = data.find(b"\n")
        raw = data if end < 0 else data[:end]
    else:
        with open_binary(path) as fh:
            raw = fh.readline()
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")


def _split_header(header: str, spec: CsvSpec) -> list[str]:
    reader = csv.reader([header], delimiter=spec.delimiter,
                        quoting=csv.QUOTE_MINIMAL if spec.quoting else csv.QUOTE_NONE)
    return [c.strip() for c in next(reader, [])]


_LOCATE_CHUNK = 8 << 20


def _chunks_at_newlines(path: Path, data: bytes | None, size: int | None = None) -> Iterator[bytes]:
    """The file's bytes in pieces of about ``size`` that end at a line break (the last piece may not)."""
    size = size or _LOCATE_CHUNK
    if data is not None:
        start = 0
        while start < len(data):
            end = data.find(b"\n", start + size)
            end = len(data) if end < 0 else end + 1
            yield data[start:end]
            start = end
        return
    with open_binary(path) as fh:
        rest = b""
        while True:
            block = fh.read(size)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            yield block[:cut]
            rest = block[cut:]
        if rest:
            yield rest


def _csv_error(path: Path, data: bytes | None, spec: CsvSpec, exc: Exception) -> DataError:
    """Locate the first line pyarrow rejects (error path only)."""
    if "Empty CSV file" in str(exc):
        return DataError("empty file (no rows)", path)
    try:
        found = _locate_csv_error(path, data, spec)
    except (OSError, EOFError, csv.Error) as inner:  # corrupt gzip, NUL bytes, ...
        return DataError(f"cannot read: {inner}", path)
    if found is None:
        return DataError(f"cannot parse ({exc})", path)
    line, message = found
    return DataError(message, path, line)


def _locate_csv_error(path: Path, data: bytes | None, spec: CsvSpec) -> tuple[int, str] | None:
    """One pass in pieces: pyarrow re-parses each piece (C++ speed) and only a piece it rejects is scanned
    row by row with the csv module, so a bad line at the end of a 20M-row file costs seconds, not minutes.
    Pieces end at line breaks, which is exact for MovieLens (no line breaks inside fields); the row scan of
    a rejected piece still understands quoting."""
    header_cols: list[str] | None = None
    line_base = 0
    for chunk in _chunks_at_newlines(path, data):
        if spec.header and header_cols is None:
            end = chunk.find(b"\n")
            first = chunk if end < 0 else chunk[: end + 1]
            header_cols = _split_header(first.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n"),
                                        spec)
            chunk, line_base = chunk[len(first):], 1
        if not _csv_chunk_parses(chunk, spec, header_cols):
            found = _scan_csv_rows(chunk, spec, header_cols, line_base)
            if found is not None:
                return found
        line_base += chunk.count(b"\n")
    return None


def _csv_chunk_parses(chunk: bytes, spec: CsvSpec, header_cols: list[str] | None) -> bool:
    names = [n for n, _ in spec.columns]
    try:
        pacsv.read_csv(
            pa.BufferReader(chunk),
            read_options=pacsv.ReadOptions(column_names=header_cols or names, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=spec.delimiter, quote_char='"' if spec.quoting else False),
            convert_options=pacsv.ConvertOptions(column_types=dict(spec.columns), include_columns=names,
                                                 null_values=[], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowKeyError):
        return False
    return True


def _scan_csv_rows(chunk: bytes, spec: CsvSpec, header_cols: list[str] | None,
                   line_base: int) -> tuple[int, str] | None:
    quoting = csv.QUOTE_MINIMAL if spec.quoting else csv.QUOTE_NONE
    if header_cols is not None:
        ncols = len(header_cols)
        positions = [(header_cols.index(n), n, t) for n, t in spec.columns]
    else:
        ncols = len(spec.columns)
        positions = [(i, n, t) for i, (n, t) in enumerate(spec.columns)]
    stream = io.TextIOWrapper(io.BytesIO(chunk), encoding="utf-8", errors="replace", newline="")
    reader = csv.reader(stream, delimiter=spec.delimiter, quoting=quoting, strict=spec.quoting)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return None
        except csv.Error as err:
            return line_base + reader.line_num, f"malformed row: {err}"
        if not row or row == [""]:
            continue  # pyarrow skips empty lines
        line = line_base + reader.line_num
        if len(row) != ncols:
            shown = spec.delimiter.join(row).replace("\x1f", "::")
            return line, f"expected {ncols} columns, got {len(row)}: {_short(shown)!r}"
        for i, name, typ in positions:
            value = row[i]
            if pa.types.is_integer(typ) and not _INT_RE.fullmatch(value):
                return line, f"column {name!r}: expected an integer, got {_short(value)!r}"
            if pa.types.is_floating(typ) and not _FLOAT_RE.fullmatch(value):
                return line, f"column {name!r}: expected a number, got {_short(value)!r}"


# --------------------------------------------------------------------------------------- JSON lines


@dataclass
class JsonField:
    """One key of a JSON-lines record.

    kind: "str" | "num" (int or float) | "int" | "str_list" (list of strings); required fields must be
    present and non-null on every line.
    """

    name: str
    kind: str
    required: bool = True


_ARROW_KIND = {"str": pa.string(), "num": pa.float64(), "int": pa.int64(), "str_list": pa.list_(pa.string())}


def read_jsonl(path: Path, fields: list[JsonField]) -> pa.Table:
    """Parse a JSON-lines file (plain or ``.gz``) keeping only ``fields``; other keys are ignored unparsed.

    Raises DataError (file and 1-based line) on bad JSON, a non-object line, a missing required key or a
    value of the wrong type.
    """
    schema = pa.schema([(f.name, _ARROW_KIND[f.kind]) for f in fields])
    parse_options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    block = 16 << 20
    while True:
        try:
            table = pajson.read_json(str(path), read_options=pajson.ReadOptions(block_size=block),
                                     parse_options=parse_options)
            break
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, EOFError) as exc:
            # One record longer than the block: retry with bigger blocks rather than call it malformed.
            if "straddl" in str(exc) and block < (1 << 31):
                block *= 4
                continue
            raise _json_error(path, fields, exc) from None
    for f in fields:
        if f.required and table.column(f.name).null_count:
            raise _json_error(path, fields, None)
    return table


def _json_error(path: Path, fields: list[JsonField], exc: Exception | None) -> DataError:
    try:
        found = _locate_json_error(path, fields)
    except (OSError, EOFError) as inner:
        return DataError(f"cannot read: {inner}", path)
    if found is None:
        return DataError(f"cannot parse ({exc})" if exc is not None else "cannot parse", path)
    line, message = found
    return DataError(message, path, line)


def _check_kind(value, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise ValueError(kind)


_KIND_WORDS = {"str": "a string", "int": "an integer", "num": "a number", "str_list": "a list of strings"}


def _locate_json_error(path: Path, fields: list[JsonField]) -> tuple[int, str] | None:
    """As for CSV: pieces ending at line breaks (exact for JSON lines) are re-parsed by pyarrow, and only a
    piece it rejects (or that lacks a required value) is checked line by line with :mod:`json`."""
    schema = pa.schema([(f.name, _ARROW_KIND[f.kind]) for f in fields])
    line_base = 0
    for chunk in _chunks_at_newlines(path, None):
        if not _json_chunk_ok(chunk, schema, fields):
            found = _scan_json_lines(chunk, fields, line_base)
            if found is not None:
                return found
        line_base += chunk.count(b"\n")
    return None


def _json_chunk_ok(chunk: bytes, schema: pa.Schema, fields: list[JsonField]) -> bool:
    try:
        table = pajson.read_json(
            pa.BufferReader(chunk),
            read_options=pajson.ReadOptions(use_threads=False, block_size=max(len(chunk), 1)),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return not any(f.required and table.column(f.name).null_count for f in fields)


def _scan_json_lines(chunk: bytes, fields: list[JsonField], line_base: int) -> tuple[int, str] | None:
    for offset, raw in enumerate(chunk.split(b"\n"), start=1):
        line = line_base + offset
        if not raw.strip():
            continue  # pyarrow skips blank lines
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return line, f"invalid JSON ({err})"
        if not isinstance(record, dict):
            return line, f"expected a JSON object, got {type(record).__name__}"
        for f in fields:
            value = record.get(f.name)
            if value is None:
                if f.required:
                    return line, f"missing required key {f.name!r}"
                continue
            if not _check_kind(value, f.kind):
                return line, f"key {f.name!r}: expected {_KIND_WORDS[f.kind]}, got {_short(json.dumps(value))}"
    return None


# --------------------------------------------------------------------------------------- columns


def factorize(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dense codes in sorted-unique order: ``uniques.take(codes) == values``.

    codes:   int64 [N] in 0 .. len(uniques) - 1
    uniques: Arrow array of the distinct values, ascending (numeric or byte-wise lexicographic).
    Hashing (pyarrow dictionary_encode) then sorting only the distinct values: O(N) on the big column.
    """
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    if pa.types.is_integer(values.type) and len(values):
        fast = _factorize_dense_ints(values)
        if fast is not None:
            return fast
    encoded = pc.dictionary_encode(values).unify_dictionaries()
    if encoded.num_chunks == 0:
        return np.zeros(0, np.int64), pa.array([], values.type)
    dictionary = encoded.chunk(0).dictionary
    indices = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in encoded.chunks])
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank[indices], dictionary.take(pa.array(order))


def _factorize_dense_ints(values: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array] | None:
    """Integer ids spanning a modest range (MovieLens: ids 1..~300k): a presence table and a cumulative sum
    give the sorted-order codes in two linear passes, several times faster than hashing 20M values."""
    ids = values.to_numpy()
    lo, hi = int(ids.min()), int(ids.max())
    lo = min(lo, 0)  # index non-negative ids directly: no shifted 20M-element copy
    if hi - lo > max(4 * len(ids), 1 << 20):
        return None  # sparse ids: the table would be mostly empty
    shifted = ids - lo if lo else ids
    present = np.zeros(hi - lo + 1, np.bool_)
    present[shifted] = True
    rank = np.cumsum(present, dtype=np.int64) - 1
    return rank[shifted], pa.array(np.flatnonzero(present) + lo, values.type)


def lookup_first(keys: pa.Array, table_keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """For each key, the row of its FIRST occurrence in ``table_keys`` (metadata may repeat ids), or -1."""
    if isinstance(table_keys, pa.ChunkedArray):
        table_keys = table_keys.combine_chunks()
    idx = pc.index_in(keys, value_set=table_keys)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def as_str_array(values: pa.Array) -> np.ndarray:
    """Arrow ids -> NumPy unicode array (``str`` elements, no pickling needed to save it)."""
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=str)


def text_column(column: pa.ChunkedArray) -> TextColumn:
    """Arrow string column -> :class:`TextColumn` (missing/null values become ""), kept in Arrow."""
    return TextColumn(column.fill_null(""))


def build_catalog(
    raw_ids: np.ndarray,
    rows: np.ndarray,
    titles: pa.ChunkedArray | pa.Array | None = None,
    categories: pa.ChunkedArray | pa.Array | None = None,
    ignore_categories: frozenset[str] = frozenset(),
) -> ItemCatalog:
    """Item catalogue from metadata rows.

    raw_ids:    [I] str, the items' raw ids (sorted; see :func:`factorize`).
    rows:       int64 [I], the metadata row of item i, -1 when the item has no metadata.
    titles:     Arrow string column per metadata row (or None: the source has no titles).
    categories: Arrow list<string> column per metadata row (or None).
    Items without metadata, or with an empty/null title, are titled by their raw id; missing categories
    become ``()``; names in ``ignore_categories`` (placeholders such as "(no genres listed)") are dropped.
    Only the I matched metadata rows are converted to Python objects (metadata files can be much larger).
    """
    n = len(raw_ids)
    have = np.flatnonzero(rows >= 0)
    take = pa.array(rows[have])
    out_titles: list[str] = raw_ids.tolist()
    out_cats: list[tuple[str, ...]] = [()] * n
    if titles is not None and len(have):
        for i, title in zip(have.tolist(), titles.take(take).to_pylist()):
            if title:
                out_titles[i] = title
    if categories is not None and len(have):
        for i, cats in zip(have.tolist(), categories.take(take).to_pylist()):
            if cats:
                out_cats[i] = tuple(c for c in cats if c and c not in ignore_categories)
    return ItemCatalog(raw_ids=raw_ids, titles=out_titles, categories=out_cats)


def require_rows(n: int, path: Path, what: str) -> None:
    if n == 0:
        raise DataError(f"no {what} (empty dataset)", path)


def iter_dir(path: Path) -> Iterator[Path]:
    return (p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith("."))


def assemble(
    name: str,
    users: pa.ChunkedArray,
    items: pa.ChunkedArray,
    timestamp: np.ndarray,
    rating: np.ndarray,
    catalog_for,
    summary: TextColumn | None = None,
    text: TextColumn | None = None,
    meta: dict | None = None,
) -> EventTable:
    """Factorize the id columns and build the EventTable (events stay in source order).

    catalog_for(item_uniques: pa.Array, raw_ids: np.ndarray[str]) -> ItemCatalog builds the catalogue of
    the items that occur in the events, in their dense order.
    """
    user, user_uniques = factorize(users)
    item, item_uniques = factorize(items)
    raw_item_ids = as_str_array(item_uniques)
    return EventTable(
        user=user,
        item=item,
        timestamp=np.ascontiguousarray(timestamp, dtype=np.int64),
        rating=np.ascontiguousarray(rating, dtype=np.float32),
        user_ids=as_str_array(user_uniques),
        items=catalog_for(item_uniques, raw_item_ids),
        summary=summary,
        text=text,
        name=name,
        meta=dict(meta or {}),
    )


_JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def is_json_lines(path: Path) -> bool:
    return path.name.endswith(_JSON_SUFFIXES)


def resolve_review_and_meta(
    path: str | os.PathLike,
    meta_path: str | os.PathLike | None,
    meta_prefixes: tuple[str, ...],
    sibling_meta_names,
    what: str,
) -> tuple[Path, Path | None]:
    """(review file, metadata file or None) for a file or a directory argument.

    Directory: exactly one JSON-lines file whose name does not start with a ``meta_prefixes`` entry (the
    reviews), and at most one that does (the metadata). File: the file itself, and the metadata file named
    by ``sibling_meta_names(review_path) -> [candidate names]`` beside it when one exists.
    An explicit ``meta_path`` always wins and must exist.
    """
    path = require_dir_or_file(path)
    meta = require_file(meta_path, "metadata file") if meta_path is not None else None
    if path.is_file():
        if meta is None:
            meta = next((path.parent / n for n in sibling_meta_names(path) if (path.parent / n).is_file()), None)
        return path, meta
    files = [p for p in iter_dir(path) if is_json_lines(p)]
    metas = [p for p in files if p.name.startswith(meta_prefixes)]
    reviews = [p for p in files if not p.name.startswith(meta_prefixes)]
    if not reviews:
        raise DataError(f"no {what} review file (*.json, *.json.gz) in this directory", path)
    if len(reviews) > 1:
        raise DataError(f"several {what} review files in this directory ({', '.join(p.name for p in reviews)}); "
                        "pass the file itself", path)
    if meta is None:
        if len(metas) > 1:
            raise DataError(f"several metadata files in this directory ({', '.join(p.name for p in metas)}); "
                            "pass meta_path", path)
        meta = metas[0] if metas else None
    return reviews[0], meta
