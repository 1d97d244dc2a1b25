"""userllm.diagnostics: the context gain and gates that every User-LLM evaluation reports (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_train import run_train, tiny_args

from userllm.diagnostics import derangement


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_derangement_moves_every_example():
    for n in (2, 3, 10, 611):
        p = derangement(n)
        assert sorted(p.tolist()) == list(range(n))
        assert not np.any(p == np.arange(n))
    assert np.array_equal(derangement(50), derangement(50))     # fixed: runs are compared on the same pairs


def test_closed_gates_give_exactly_no_gain(tmp_path, cache, capsys):
    """Gates at tanh(0) = 0 and never trained (lr 0): the LLM cannot see the user, so every context
    scores the same loss, and the evaluation says so in metrics.json and in the table."""
    run_train(tiny_args(cache, tmp_path / "run", xattn_gate_init=0.0, lr=0.0, steps=1))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    t = m["test"]
    assert t["loss_own"] == pytest.approx(t["loss"])
    assert t["context_gain"] == 0.0 and t["context_gain_none"] == 0.0
    assert t["gates"] == {"attn": [0.0, 0.0], "ffn": [0.0, 0.0]}
    assert set(m["baselines"]) == {"popularity", "encoder"}
    out = capsys.readouterr().out
    assert "gain(shuf)" in out and "encoder (own head)" in out and "tanh(gates)" in out
