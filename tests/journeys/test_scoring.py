"""Name scores: ROUGE from rouge-score, exact and partial label match, and the table."""

from __future__ import annotations

import pytest

from userllm.journeys.scoring import format_rows, name_scores


def test_name_scores():
    refs = ["sci-fi, dystopia, atmospheric", "comedy, romance", "drama"]
    names = ["dystopia, comedy", "romantic comedy", "thriller"]
    s = name_scores(names, refs)
    assert s["count"] == 3
    assert s["exact"] == pytest.approx(1 / 3)          # only "dystopia" is a whole reference label
    assert s["partial"] == pytest.approx(2 / 3)        # "comedy" is a word of a reference label too
    perfect = name_scores(refs, refs)
    assert perfect["rougeL"] == pytest.approx(1.0) and perfect["exact"] == 1.0 and perfect["partial"] == 1.0
    assert name_scores(["x"], ["y"])["rouge1"] == 0.0
    with pytest.raises(ValueError):
        name_scores(["a"], [])


def test_format_rows():
    text = format_rows([{"method": "baseline", "rougeL": 0.5, "n": 3}, {"method": "fewshot", "rougeL": None}],
                       ["method", "rougeL", "n"], "title")
    lines = text.splitlines()
    assert lines[0] == "title" and lines[2].split() == ["baseline", "0.5000", "3"]
    assert lines[3].split() == ["fewshot", "-", "-"]
