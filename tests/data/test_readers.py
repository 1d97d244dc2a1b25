"""Readers: every real format on tiny hand-written fixtures, malformed variants located by file and line,
and the real samples in ../shared/data (skipped when absent)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from userllm.data.events import EventTable, TextColumn
from userllm.data.readers import (
    detect_movielens_format,
    read_amazon,
    read_events,
    read_google_local,
    read_google_local_meta,
    read_movielens,
)
from userllm.errors import DataError, UserError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "readers"
ML = FIX / "movielens"


def check_table(ev: EventTable) -> None:
    """Canonical dtypes and dense, in-range indices."""
    assert ev.user.dtype == np.int64 and ev.item.dtype == np.int64
    assert ev.timestamp.dtype == np.int64 and ev.rating.dtype == np.float32
    assert ev.user.min() >= 0 and ev.user.max() == ev.num_users - 1
    assert ev.item.min() >= 0 and ev.item.max() == ev.num_items - 1
    assert len(np.unique(ev.user)) == ev.num_users and len(np.unique(ev.item)) == ev.num_items
    assert len(ev.items.titles) == len(ev.items.categories) == ev.num_items
    assert all(isinstance(c, tuple) for c in ev.items.categories)


def copy_fixture(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / Path(name).name
    shutil.copytree(FIX / name, dest)
    return dest


def replace_line(path: Path, line: int, new: str, encoding: str = "utf-8") -> None:
    """Overwrite 1-based ``line`` of a (possibly gzipped) file, keeping its line endings."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    ending = b"\r" if lines[0].endswith(b"\r") else b""
    lines[line - 1] = new.encode(encoding) + ending
    with opener(path, "wb") as fh:
        fh.write(b"\n".join(lines))


def rows_of(ev: EventTable) -> list[tuple]:
    """Events as (raw user, raw item, timestamp, rating) in file order."""
    return [(ev.user_ids[u], ev.items.raw_ids[i], int(t), float(r))
            for u, i, t, r in zip(ev.user, ev.item, ev.timestamp, ev.rating)]


# ----------------------------------------------------------------------------------------- MovieLens


def test_movielens_csv():
    ev = read_movielens(ML / "ml-csv")
    check_table(ev)
    assert ev.name == "movielens" and ev.meta["format"] == "csv"
    assert ev.meta["files"] == [str(ML / "ml-csv" / "ratings.csv"), str(ML / "ml-csv" / "movies.csv")]
    assert ev.summary is None and ev.text is None
    # Users/items numbered in numeric raw-id order (10 after 2, not between 1 and 2).
    assert ev.user_ids.tolist() == ["1", "2", "10"]
    assert ev.items.raw_ids.tolist() == ["1", "3", "6", "50", "99999"]  # 7 is never rated: not listed
    assert rows_of(ev)[0] == ("1", "1", 964982703, 4.0)
    assert rows_of(ev)[-1] == ("10", "6", 1445715100, 3.0)
    assert ev.user.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert ev.items.titles == ["Toy Story (1995)", "American President, The (1995)",
                               'Great "Quoted" Movie, A (1999)', "Usual Suspects (1995)", "99999"]
    assert ev.items.categories == [("Adventure", "Animation", "Children", "Comedy", "Fantasy"),
                                   ("Comedy", "Drama", "Romance"), ("Drama",), (), ()]
    assert ev.rating.tolist() == [4.0, 4.0, 5.0, 3.5, 2.5, 0.5, 3.0]


def test_movielens_dat_latin1():
    ev = read_movielens(ML / "ml-dat" / "ratings.dat")  # a file inside the release works too
    check_table(ev)
    assert ev.meta["format"] == "dat"
    assert ev.items.raw_ids.tolist() == ["661", "1193", "2000", "3000"]
    by_id = dict(zip(ev.items.raw_ids, zip(ev.items.titles, ev.items.categories)))
    assert by_id["2000"] == ("Crónica de una fuga (2006)", ("Drama", "Thriller"))
    assert by_id["661"][1] == ("Animation", "Children's", "Musical")
    assert by_id["3000"][0] == '"Quoted", a Title (1990)'  # bare quotes are not CSV quoting here
    assert rows_of(ev)[:2] == [("1", "1193", 978300760, 5.0), ("1", "661", 978302109, 3.0)]


def test_movielens_100k(tmp_path):
    ev = read_movielens(ML / "ml-100k")
    check_table(ev)
    assert ev.meta["format"] == "100k"
    assert ev.user_ids.tolist() == ["22", "186", "196"]
    assert ev.items.raw_ids.tolist() == ["242", "302", "377"]
    assert ev.items.titles == ["Kolya (1996)", "L.A. Confidential (1997)", "Café Society (1995)"]
    assert ev.items.categories == [("Comedy",), ("Crime", "Film-Noir", "Mystery", "Thriller"), ()]
    assert rows_of(ev)[2] == ("22", "377", 878887116, 1.0)
    # Without u.genre the standard genre list gives the same names.
    release = copy_fixture(tmp_path, "movielens/ml-100k")
    (release / "u.genre").unlink()
    assert read_movielens(release).items.categories == ev.items.categories


def test_movielens_without_movie_file(tmp_path):
    release = copy_fixture(tmp_path, "movielens/ml-csv")
    (release / "movies.csv").unlink()
    ev = read_movielens(release)
    assert ev.items.titles == ev.items.raw_ids.tolist() and ev.items.categories == [()] * 5


def test_movielens_detection_errors(tmp_path):
    with pytest.raises(DataError, match="not found|no such"):
        read_movielens(tmp_path / "missing")
    (tmp_path / "README.txt").write_text("hello")
    with pytest.raises(DataError, match="not a MovieLens release") as err:
        read_movielens(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert detect_movielens_format(ML / "ml-100k" / "u.item")[0] == "100k"


ML_BAD = [
    # (release, file, line, new content, message fragment)
    ("ml-csv", "ratings.csv", 3, "1,3,4.0", "expected 4 columns, got 3"),
    ("ml-csv", "ratings.csv", 4, "1,50,5.0,964982931,extra", "expected 4 columns, got 5"),
    ("ml-csv", "ratings.csv", 5, "x2,3,3.5,1445714835", "'userId': expected an integer"),
    ("ml-csv", "ratings.csv", 6, "2,tt99,2.5,1445714900", "'movieId': expected an integer"),
    ("ml-csv", "ratings.csv", 7, "10,1,good,1445715000", "'rating': expected a number"),
    ("ml-csv", "ratings.csv", 8, "10,6,3.0,", "'timestamp': expected an integer"),
    ("ml-csv", "ratings.csv", 1, "user,movie,rating,timestamp", "expected a header"),
    ("ml-csv", "movies.csv", 3, "3,American President, The (1995),Comedy", "expected 3 columns, got 4"),
    ("ml-csv", "movies.csv", 4, "six,Movie (1999),Drama", "'movieId': expected an integer"),
    ("ml-dat", "ratings.dat", 2, "1::661::3", "expected 4 columns, got 3"),
    ("ml-dat", "ratings.dat", 3, "2::1193::four::978298413", "'rating': expected a number"),
    ("ml-dat", "ratings.dat", 5, "3:::3000::2::978300100", "'movieId': expected an integer"),
    ("ml-dat", "movies.dat", 2, "661::James (1996)", "expected 3 columns, got 2"),
    ("ml-100k", "u.data", 3, "22 377 1 878887116", "expected 4 columns, got 1"),
    ("ml-100k", "u.item", 2, "302|L.A. Confidential (1997)|01-Jan-1997||http://x|0|1", "expected 24 columns"),
]


@pytest.mark.parametrize("release,name,line,content,fragment", ML_BAD, ids=[f"{r}-{n}-{l}" for r, n, l, *_ in ML_BAD])
def test_movielens_malformed(tmp_path, release, name, line, content, fragment):
    directory = copy_fixture(tmp_path, f"movielens/{release}")
    replace_line(directory / name, line, content)
    with pytest.raises(DataError) as err:
        read_movielens(directory)
    message = str(err.value)
    assert message.startswith(f"{directory / name}:{line}: "), message
    assert fragment in message
    assert err.value.line == line and err.value.path == str(directory / name)


def test_movielens_error_line_counts_blank_lines(tmp_path):
    directory = copy_fixture(tmp_path, "movielens/ml-csv")
    replace_line(directory / "ratings.csv", 3, "")  # pyarrow skips it, the line count must not
    replace_line(directory / "ratings.csv", 5, "2,3,3.5")
    with pytest.raises(DataError, match=r"ratings\.csv:5: expected 4 columns"):
        read_movielens(directory)


def test_movielens_empty(tmp_path):
    directory = copy_fixture(tmp_path, "movielens/ml-csv")
    (directory / "ratings.csv").write_text("userId,movieId,rating,timestamp\r\n")
    with pytest.raises(DataError, match=r"ratings\.csv: no ratings"):
        read_movielens(directory)
    (directory / "ratings.csv").write_text("")
    with pytest.raises(DataError, match=r"ratings\.csv:1: empty file"):
        read_movielens(directory)
    dat = copy_fixture(tmp_path, "movielens/ml-dat")
    (dat / "ratings.dat").write_bytes(b"")
    with pytest.raises(DataError, match=r"ratings\.dat: empty file"):
        read_movielens(dat)
    k100 = copy_fixture(tmp_path, "movielens/ml-100k")
    (k100 / "u.data").write_text("\n\n")
    with pytest.raises(DataError, match=r"u\.data: no ratings"):
        read_movielens(k100)


# -------------------------------------------------------------------------------------------- Amazon


def test_amazon_plain_with_sibling_meta():
    ev = read_amazon(FIX / "amazon" / "Fixture_5.json")  # meta_Fixture.json found beside it
    check_table(ev)
    assert ev.name == "amazon" and ev.meta["meta_path"].endswith("meta_Fixture.json")
    assert ev.user_ids.tolist() == ["A1QQ", "A2ZX", "A3PP"]
    assert ev.items.raw_ids.tolist() == ["0005019281", "B0001", "B0002"]  # strings, leading zeros kept
    assert ev.items.titles == ["0005019281", "Blue Shirt", "B0002"]  # no meta / empty title -> asin
    assert ev.items.categories == [(), ("Clothing, Shoes & Jewelry", "Men", "Shirts"), ()]  # first record wins
    assert rows_of(ev) == [("A2ZX", "B0002", 1441324800, 5.0), ("A1QQ", "B0001", 1441411200, 3.0),
                           ("A2ZX", "0005019281", 1441497600, 1.0), ("A3PP", "B0001", 1441584000, 4.0)]
    assert ev.summary.to_list() == ["Five Stars", "Okay", "Bad", "Four Stars"]
    assert ev.text.to_list() == ["Great, fits well.", "", "Broke après une semaine ☹", "Nice"]  # missing -> ""
    assert isinstance(ev.summary, TextColumn) and isinstance(ev.text, TextColumn)


def test_amazon_gz_dir_and_plain_agree():
    plain = read_amazon(FIX / "amazon")  # a directory: one review file + one meta file
    gz = read_events("amazon", FIX / "amazon_gz")
    assert rows_of(plain) == rows_of(gz)
    assert plain.items.titles == gz.items.titles and plain.items.categories == gz.items.categories
    assert plain.text.to_list() == gz.text.to_list()
    no_meta = read_amazon(FIX / "amazon_gz" / "Fixture_5.json.gz", meta_path=FIX / "amazon" / "meta_Fixture.json")
    assert no_meta.items.titles == gz.items.titles


def test_amazon_ids_do_not_depend_on_line_order(tmp_path):
    lines = (FIX / "amazon" / "Fixture_5.json").read_text().splitlines(keepends=True)
    (tmp_path / "r.json").write_text("".join(reversed(lines)))
    a, b = read_amazon(FIX / "amazon" / "Fixture_5.json"), read_amazon(tmp_path / "r.json")
    assert a.user_ids.tolist() == b.user_ids.tolist() and a.items.raw_ids.tolist() == b.items.raw_ids.tolist()
    assert rows_of(a) == rows_of(b)[::-1]


JSON_BAD = [
    # (fixture dir, file, line, new content, message fragment)
    ("amazon", "Fixture_5.json", 2, '{"overall": 3, "reviewerID": "A1QQ", "asin": ', "invalid JSON"),
    ("amazon", "Fixture_5.json", 3, '{"overall": 1.0, "reviewerID": "A2ZX", "unixReviewTime": 1}', "missing required key 'asin'"),
    ("amazon", "Fixture_5.json", 1, '{"overall": "five", "reviewerID": "A", "asin": "B", "unixReviewTime": 1}', "'overall': expected a number"),
    ("amazon", "Fixture_5.json", 4, '{"overall": 4, "reviewerID": "A", "asin": "B", "unixReviewTime": "soon"}', "'unixReviewTime': expected an integer"),
    ("amazon", "Fixture_5.json", 2, '[1, 2]', "expected a JSON object"),
    ("amazon", "meta_Fixture.json", 2, '{"asin": "B0002", "title": }', "invalid JSON"),
    ("amazon", "meta_Fixture.json", 3, '{"asin": "B0001", "category": "Shirts"}', "'category': expected a list of strings"),
    ("amazon_gz", "Fixture_5.json.gz", 3, '{"overall": 1.0, "reviewerID": null, "asin": "B", "unixReviewTime": 1}', "missing required key 'reviewerID'"),
    ("amazon_gz", "meta_Fixture.json.gz", 1, 'not json', "invalid JSON"),
    ("google_local", "review-Fixture.json", 2, '{"user_id": "1", "time": 1612150000999, "rating": 4}', "missing required key 'gmap_id'"),
    ("google_local", "review-Fixture.json", 1, '{"user_id": "1", "gmap_id": "g", "time": "yesterday", "rating": 4}', "'time': expected an integer"),
    ("google_local", "review-Fixture.json", 3, '{"user_id": "1", "gmap_id": "g", "time": 1, "rating": "5"}', "'rating': expected a number"),
    ("google_local", "meta-Fixture.json", 2, '{"name": "Corner Gas", "gmap_id": "0x88:0xb2", "category": null', "invalid JSON"),
    ("google_local_gz", "review-Fixture_10.json.gz", 2, '{"user_id": 17, "gmap_id": "g", "time": 1, "rating": 1}', "'user_id': expected a string"),
]


@pytest.mark.parametrize("folder,name,line,content,fragment", JSON_BAD, ids=[f"{f}-{n}-{l}" for f, n, l, *_ in JSON_BAD])
def test_json_malformed(tmp_path, folder, name, line, content, fragment):
    directory = copy_fixture(tmp_path, folder)
    replace_line(directory / name, line, content)
    reader = read_amazon if folder.startswith("amazon") else read_google_local
    with pytest.raises(DataError) as err:
        reader(directory)
    message = str(err.value)
    assert message.startswith(f"{directory / name}:{line}: "), message
    assert fragment in message


def test_json_errors_count_blank_lines_and_empty_files(tmp_path):
    lines = (FIX / "amazon" / "Fixture_5.json").read_text().splitlines()
    (tmp_path / "r.json").write_text("\n".join([lines[0], "", lines[1], '{"asin": "B1"', lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"r\.json:4: invalid JSON"):
        read_amazon(tmp_path / "r.json")
    (tmp_path / "r.json").write_text("\n")
    with pytest.raises(DataError, match=r"r\.json: no reviews"):
        read_amazon(tmp_path / "r.json")


def test_json_path_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_amazon(tmp_path / "nope.json")
    with pytest.raises(DataError, match="metadata file not found"):
        read_amazon(FIX / "amazon" / "Fixture_5.json", meta_path=tmp_path / "meta_missing.json")
    with pytest.raises(DataError, match="no Google Local review file"):
        read_google_local(tmp_path)  # empty directory: unknown format
    (tmp_path / "a.json").write_text("{}\n")
    (tmp_path / "b.json").write_text("{}\n")
    with pytest.raises(DataError, match="several Amazon review files"):
        read_amazon(tmp_path)


# -------------------------------------------------------------------------------------- Google Local


def test_google_local_plain_and_gz():
    ev = read_google_local(FIX / "google_local" / "review-Fixture.json")  # meta-Fixture.json beside it
    check_table(ev)
    assert ev.name == "google_local" and ev.summary is None
    assert ev.user_ids.tolist() == ["101463350189962023774", "108991152262655788985"]
    assert ev.items.raw_ids.tolist() == ["0x87:0xa1", "0x88:0xb2", "0x99:0xc3"]
    assert ev.items.titles == ["Rapid Diner", "Corner Gas", "0x99:0xc3"]  # duplicate meta: first wins
    assert ev.items.categories == [("Restaurant", "Diner"), (), ()]
    assert ev.timestamp.tolist() == [1628100851, 1612150000, 1630000000]  # milliseconds -> seconds
    assert ev.rating.tolist() == [5.0, 4.0, 2.0]
    assert ev.text.to_list() == ["Great food, friendly staff", "", "Meh"]
    # review-<State>_10.json.gz finds meta-<State>.json.gz beside it.
    gz = read_google_local(FIX / "google_local_gz" / "review-Fixture_10.json.gz")
    assert rows_of(gz) == rows_of(ev) and gz.items.titles == ev.items.titles
    assert read_events("google_local", FIX / "google_local").items.categories == ev.items.categories


def test_google_local_meta_dict():
    meta = read_google_local_meta(FIX / "google_local" / "meta-Fixture.json")
    assert meta == {"0x87:0xa1": ("Rapid Diner", ("Restaurant", "Diner")), "0x88:0xb2": ("Corner Gas", ()),
                    "0x77:0xd4": ("Unvisited", ("Park",))}
    assert list(meta) == ["0x87:0xa1", "0x88:0xb2", "0x77:0xd4"]  # first-appearance order


def test_read_events_unknown_source():
    with pytest.raises(UserError, match="movielens, amazon, google_local") as err:
        read_events("netflix", FIX)
    assert not isinstance(err.value, DataError)


# ----------------------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_movielens_latest_small(shared_data):
    ev = read_events("movielens", shared_data / "movielens" / "ml-latest-small")
    check_table(ev)
    assert (len(ev), ev.num_users, ev.num_items) == (100_836, 610, 9_724)
    assert ev.user_ids[0] == "1" and ev.user_ids[-1] == "610"
    titles = dict(zip(ev.items.raw_ids, ev.items.titles))
    cats = dict(zip(ev.items.raw_ids, ev.items.categories))
    assert titles["1"] == "Toy Story (1995)"
    assert titles["11"] == "American President, The (1995)"  # quoted title with a comma
    assert cats["1"] == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
    assert sum(1 for c in ev.items.categories if c == ()) > 0  # "(no genres listed)"
    assert not any("(no genres listed)" in c for c in ev.items.categories)
    assert rows_of(ev)[0] == ("1", "1", 964982703, 4.0)
    assert set(np.unique(ev.rating).tolist()) == {x / 2 for x in range(1, 11)}


@pytest.mark.shared_data
@pytest.mark.parametrize("name,reviews,users,items", [
    ("AMAZON_FASHION_5.json", 3_176, 406, 31),
    ("Movies_and_TV_5.head5000.json", 5_000, 4_624, 61),
])
def test_real_amazon(shared_data, name, reviews, users, items):
    path = shared_data / "amazon" / name
    ev = read_amazon(path)
    check_table(ev)
    assert (len(ev), ev.num_users, ev.num_items) == (reviews, users, items)
    with open(path, encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    assert rows_of(ev)[0] == (first["reviewerID"], first["asin"], first["unixReviewTime"], first["overall"])
    assert ev.summary[0] == first["summary"] and ev.text[0] == first.get("reviewText", "")
    assert ev.items.titles == ev.items.raw_ids.tolist()  # no metadata here


@pytest.mark.shared_data
def test_real_google_local_meta(shared_data):
    path = shared_data / "google_local" / "meta_South_Dakota.json.gz"
    meta = read_google_local_meta(path)
    assert len(meta) == 14_167
    firsts: dict[str, dict] = {}
    rows = 0
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            rows += 1
            firsts.setdefault(record["gmap_id"], record)
    assert rows == 14_257 and list(meta) == list(firsts)
    for gmap_id in list(firsts)[::500]:
        record = firsts[gmap_id]
        assert meta[gmap_id] == (record["name"] or gmap_id, tuple(record["category"] or ()))
    assert len({c for _, cats in meta.values() for c in cats}) == 2_077


# ------------------------------------------------------------------------------------------ internals


def test_factorize_sorted_codes():
    import pyarrow as pa

    from userllm.data.readers._common import factorize

    cases = [
        [7, 3, 7, 1, 3],  # dense integer ids: presence-table path
        [5, -3, 5, 10**15, 7],  # sparse / negative ids: hashing path
        ["b", "a", "b", "c"],  # strings: hashing path, byte-wise order
    ]
    for values in cases:
        half = len(values) // 2
        codes, uniques = factorize(pa.chunked_array([pa.array(values[:half]), pa.array(values[half:])]))
        expected_uniques, expected_codes = np.unique(np.array(values), return_inverse=True)
        assert codes.dtype == np.int64
        assert codes.tolist() == expected_codes.tolist()
        assert uniques.to_pylist() == expected_uniques.tolist()


def test_error_location_across_pieces(tmp_path, monkeypatch):
    """The error path re-parses the file in pieces; line numbers must carry across piece boundaries."""
    from userllm.data.readers import _common

    monkeypatch.setattr(_common, "_LOCATE_CHUNK", 64)
    ratings = ["userId,movieId,rating,timestamp"] + [f"{u},{u % 7},4.0,{1000 + u}" for u in range(1, 60)]
    ratings[41] = "41,6,4.0"  # line 42
    release = tmp_path / "ml"
    release.mkdir()
    (release / "ratings.csv").write_text("\r\n".join(ratings) + "\r\n")
    with pytest.raises(DataError, match=r"ratings\.csv:42: expected 4 columns, got 3"):
        read_movielens(release)

    dat = tmp_path / "ml-dat"
    dat.mkdir()
    lines = [f"{u}::{u % 5}::3::{900 + u}" for u in range(1, 50)]
    lines[36] = "37::4::3::later"  # line 37
    (dat / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:37: column 'timestamp'"):
        read_movielens(dat)

    records = [json.dumps({"reviewerID": f"U{i}", "asin": f"I{i % 3}", "overall": 5.0, "unixReviewTime": i})
               for i in range(40)]
    records[29] = json.dumps({"reviewerID": "U29", "overall": 5.0, "unixReviewTime": 29})  # line 30
    with gzip.open(tmp_path / "Big_5.json.gz", "wt") as fh:
        fh.write("\n".join(records) + "\n")
    with pytest.raises(DataError, match=r"Big_5\.json\.gz:30: missing required key 'asin'"):
        read_amazon(tmp_path / "Big_5.json.gz")
