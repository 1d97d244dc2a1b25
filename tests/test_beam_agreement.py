"""benchmarks/beam_agreement.py: one decode scored against every encoder rank equals the per-rank definition
(the beams' Recall@10 with that rank's candidate as the label)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from test_train import run_train, tiny_args

REPO = Path(__file__).resolve().parents[1]


def load_module():
    spec = importlib.util.spec_from_file_location("beam_agreement", REPO / "benchmarks" / "beam_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_decode_matches_the_per_rank_recall(tmp_path, capsys):
    from userllm.data.examples import make_examples
    from userllm.evaluation import eval_subset, generate_and_score
    from userllm.factory import load_run

    run_dir = tmp_path / "run"
    run_train(tiny_args(tmp_path / "cache", run_dir, eval_users=0, beams=10))
    ba = load_module()
    ba.main([str(run_dir), "--users", "0", "--ranks", "0,1,2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = load_run(run_dir, threads=1)
    ex = eval_subset(make_examples(r.ds, "nextitem", r.cfg.window, "test"), 0)
    rng = np.random.default_rng(0)
    candidates = rng.integers(1, len(r.ds.vocabs["item"]), size=(len(ex.labels), 3))
    once = generate_and_score(r.model, r.batcher, r.ds, ex, beams=10, disable_progress=True, keep_entries=True)
    shares = ba.agreement(once["entries"], candidates, r.batcher.catalogue.label_to_entry, [0, 1, 2])
    for rank in (0, 1, 2):
        per_rank = generate_and_score(r.model, r.batcher, r.ds, replace(ex, labels=candidates[:, rank]), beams=10,
                                      disable_progress=True)
        assert shares[rank] == pytest.approx(per_rank["recall@10"], abs=1e-4)
    assert any(v > 0 for v in shares.values())  # the catalogue is small: some candidates are in the beams
    assert set(printed) == {"0", "1", "2"} and all(0.0 <= v <= 1.0 for v in printed.values())
    ba.main([str(run_dir), "--users", "0", "--ranks", "0,1,2", "--decoder", "exact"])   # the exact top 10
    exact = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(exact) == {"0", "1", "2"} and all(0.0 <= v <= 1.0 for v in exact.values())
