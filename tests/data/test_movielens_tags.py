"""``read_movielens_tags``: tags.csv / tags.dat of a release (quoted commas, blank tags, errors by line),
None for a release without tags, and the real ml-latest-small file (skipped when ../shared/data is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from userllm.data.readers import read_movielens_tags
from userllm.errors import DataError

ML = Path(__file__).resolve().parents[1] / "fixtures" / "readers" / "movielens"


def _release(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(ML / name, dest)
    return dest


def test_csv_tags(tmp_path):
    release = _release(tmp_path, "ml-csv")
    assert read_movielens_tags(release) is None
    (release / "tags.csv").write_bytes(b'userId,movieId,tag,timestamp\r\n2,1,funny,1445714994\r\n'
                                       b'10,50,"twist ending, great",1445714996\r\n1,3,  ,1445714997\r\n'
                                       b'1,3, dark comedy ,1445714998\r\n')
    t = read_movielens_tags(release / "ratings.csv")
    assert t.column_names == ["userId", "movieId", "tag", "timestamp"]
    assert t.column("userId").to_pylist() == [2, 10, 1]
    assert t.column("movieId").to_pylist() == [1, 50, 3]
    assert t.column("tag").to_pylist() == ["funny", "twist ending, great", "dark comedy"]   # blank dropped
    assert t.column("timestamp").to_pylist() == [1445714994, 1445714996, 1445714998]


def test_dat_tags_and_errors(tmp_path):
    release = _release(tmp_path, "ml-dat")
    (release / "tags.dat").write_bytes(b"1::1193::classic::978300760\n2::661::Hitchcock::978302109\n")
    assert read_movielens_tags(release).column("tag").to_pylist() == ["classic", "Hitchcock"]
    (release / "tags.dat").write_bytes(b"1::1193::classic::978300760\nx::661::Hitchcock::978302109\n")
    with pytest.raises(DataError, match=r"tags\.dat:2"):
        read_movielens_tags(release)


def test_ml_latest_small_tags(shared_data):
    t = read_movielens_tags(shared_data / "movielens" / "ml-latest-small")
    # SOURCE.md / the issue: 3,683 tag applications on 1,572 movies by 58 users.
    assert t.num_rows == 3683
    assert len(set(t.column("movieId").to_pylist())) == 1572
    assert len(set(t.column("userId").to_pylist())) == 58
