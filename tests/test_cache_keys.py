"""json_digest: the one canonical form every cache key is made with (changing it would orphan every cache)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from userllm.utils.cache import json_digest


def test_json_digest_is_canonical_json_and_stable():
    a = json_digest({"b": [1, 2], "a": {"y": 1, "x": 2}})
    assert a == json_digest({"a": {"x": 2, "y": 1}, "b": [1, 2]})            # key order does not matter
    assert a == hashlib.sha256(b'{"a": {"x": 2, "y": 1}, "b": [1, 2]}').hexdigest()
    assert json_digest({"a": 1}, 16) == json_digest({"a": 1})[:16] and len(json_digest({}, 16)) == 16
    assert json_digest({"p": Path("/x")}) == json_digest({"p": "/x"})         # non-JSON values as str
    assert json_digest({"a": 1}) != json_digest({"a": 2})
