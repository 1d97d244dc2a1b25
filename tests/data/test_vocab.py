import json

import numpy as np
import pytest

from userllm.data.vocab import PAD_ID, UNK_ID, Vocabulary, rating_vocabulary, token_key


def test_reserved_ids():
    assert PAD_ID == -1 and UNK_ID == 0
    v = Vocabulary(["a", "b"])
    assert len(v) == 3  # table rows: unk + 2 tokens; padding is not a row
    assert v.tokens == ["<unk>", "a", "b"]
    assert v.id("a") == 1 and v.id("b") == 2 and v.id("zzz") == UNK_ID
    assert v.id("<unk>") == UNK_ID and "<unk>" not in v
    assert v.token(-1) is None and v.token(0) == "<unk>"


def test_build_frequency_order_and_min_count():
    values = np.array(["b", "a", "c", "b", "a", "b", "d"])
    v = Vocabulary.build(values)
    assert v.tokens[1:] == ["b", "a", "c", "d"]  # by count, ties by token
    assert v.counts.tolist() == [3, 2, 1, 1]
    v2 = Vocabulary.build(values, min_count=2)
    assert v2.tokens[1:] == ["b", "a"]
    assert v2.encode(values).tolist() == [1, 2, 0, 1, 2, 1, 0]


def test_build_sorted_and_given_orders():
    assert Vocabulary.build([3, 1, 2, 1], order="sorted").tokens[1:] == ["1", "2", "3"]
    assert Vocabulary.build(["z", "x", "y"], order="given").tokens[1:] == ["z", "x", "y"]
    with pytest.raises(ValueError):
        Vocabulary.build([1], order="random")
    with pytest.raises(ValueError):
        Vocabulary.build([1], min_count=0)


def test_encode_shapes_and_dtypes():
    v = Vocabulary.build(np.array(["x", "y", "z"]))
    ids = v.encode(np.array([["x", "q"], ["z", "y"]]))
    assert ids.dtype == np.int64 and ids.shape == (2, 2)
    assert v.decode(ids) == [["x", "<unk>"], ["z", "y"]]
    assert v.encode(np.array([], dtype=str)).shape == (0,)
    obj = np.array(["x", None, "y"], dtype=object)
    assert v.encode(obj).tolist() == [v.id("x"), UNK_ID, v.id("y")]
    assert v.decode([-1, 1]) == [None, v.tokens[1]]
    with pytest.raises(IndexError):
        v.decode([len(v)])


def test_numeric_tokens_and_nan():
    assert token_key(4.0) == "4" and token_key(np.float32(4.5)) == "4.5" and token_key(np.int64(7)) == "7"
    assert token_key(float("nan")) is None and token_key(None) is None
    ratings = np.array([4.0, 4.5, np.nan, 1.0, 4.0], dtype=np.float32)
    v = rating_vocabulary(ratings)
    assert v.tokens[1:] == ["1", "4", "4.5"]  # ascending by value, NaN is not a token
    assert v.encode(ratings).tolist() == [2, 3, UNK_ID, 1, 2]
    assert v.encode(np.array([np.nan, np.nan])).tolist() == [UNK_ID, UNK_ID]
    assert len(rating_vocabulary(np.full(3, np.nan))) == 1  # a source without ratings: only UNK
    # integer and float arrays of the same values map to the same ids
    assert v.encode(np.array([1, 4])).tolist() == v.encode(np.array([1.0, 4.0])).tolist()


def test_json_round_trip():
    values = np.array(["α", "b", "b", "c d", "e\"q"])
    v = Vocabulary.build(values, name="category")
    text = v.to_json()
    json.loads(text)
    w = Vocabulary.from_json(text)
    assert w == v and w.name == "category" and w.tokens == v.tokens
    assert w.counts.tolist() == v.counts.tolist()
    assert np.array_equal(w.encode(values), v.encode(values))


def test_duplicate_and_reserved_tokens_rejected():
    with pytest.raises(ValueError):
        Vocabulary(["a", "a"])
    with pytest.raises(ValueError):
        Vocabulary(["<unk>"])
